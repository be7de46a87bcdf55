"""DistributedDataParallel on CPU (gloo, 2 processes): 2 ranks of batch B train the model 1 process of
batch 2B trains, U of uiat-fgsm stays identical on every rank, rank 0 alone writes the run, and a run
resumes across world sizes."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iat import config as C
from iat.runtime.checkpoint import load_checkpoint
from iat.training.trainer import Trainer

from gloo_helpers import bundle, free_port

METHODS = ("standard", "pgd-at", "uiat-fgsm")


def make_cfg(method: str, epochs: int = 1) -> C.TrainConfig:
    cfg = C.TrainConfig(method=method, model="cnn", seed=5, device="cpu", progress=False)
    cfg.data = C.DataConfig(name="synthetic", val_size=32)
    cfg.optim = C.OptimConfig(epochs=epochs, batch_size=32, lr=0.05, schedule="constant")
    cfg.threat = C.ThreatModel(eps=8 / 255, step_size=2 / 255, steps=2)
    cfg.val = C.ValConfig(steps=1, n_examples=16, batch_size=16)
    cfg.speed = C.SpeedConfig(layout="nchw", compile=False)  # fixed, so a run cut short without fit() has its training forward
    return cfg


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        for method in METHODS:
            trainer = Trainer(make_cfg(method), Path(root) / method, bundle())
            trainer.fit()
            torch.save({k: v.clone() for k, v in trainer.method.state_dict().items()},
                       Path(root) / f"{method}-state-rank{rank}.pt")
        # Resume, across world sizes: epoch 1 was run by one process (see the test), epoch 2 by two.
        trainer = Trainer(make_cfg("pgd-at", epochs=2), Path(root) / "resumed", bundle())
        trainer.resume()
        trainer.fit()
    finally:
        dist.destroy_process_group()


def _single(method: str, out: Path, epochs: int = 1, stop_after: int = 0) -> Trainer:
    trainer = Trainer(make_cfg(method, epochs), out, bundle())
    if not stop_after:
        trainer.fit()
        return trainer
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(stop_after):  # what fit does, cut short as if the job had been stopped
        trainer.end_epoch(epoch, trainer.train_epoch(epoch), 0.0)
    return trainer


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.safetensors")["model"] for r in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-5), f"{key}: {(wa[key] - wb[key]).abs().max()}"


def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path):
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    _single("pgd-at", ddp / "resumed", epochs=2, stop_after=1)
    mp.spawn(_worker, args=(2, free_port(), str(ddp)), nprocs=2, join=True)
    for method in METHODS:
        _single(method, ref / method)
        assert_same_weights(ddp / method, ref / method)
        # rank 0 wrote the run; the metric lines are the means over both ranks' batches
        lines = (ddp / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1
    _single("pgd-at", ref / "resumed", epochs=2)
    assert_same_weights(ddp / "resumed", ref / "resumed")
    assert len((ddp / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2

    u0, u1 = (torch.load(ddp / f"uiat-fgsm-state-rank{r}.pt") for r in (0, 1))
    assert u0["universal"].abs().sum() > 0  # U moved
    assert torch.equal(u0["universal"], u1["universal"]) and torch.equal(u0["momentum"], u1["momentum"])
    u_ref = load_checkpoint(ref / "uiat-fgsm" / "checkpoints" / "last.safetensors")["method_state"]["universal"]
    assert torch.allclose(u0["universal"], u_ref, atol=1e-6)


def test_global_batch_must_split_evenly(monkeypatch, tmp_path):
    from iat.runtime.distributed import DistInfo
    from iat.errors import UsageError

    monkeypatch.setattr("iat.runtime.distributed.setup", lambda device: (DistInfo(0, 3, 0), device))
    with pytest.raises(UsageError, match="divisible"):
        Trainer(make_cfg("standard"), tmp_path, bundle())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IAT_SLOW") != "1", reason="slow: opt in with IAT_SLOW=1")
def test_torchrun_cli_overwrites_and_resumes_a_run(tmp_path):
    """`torchrun -m iat train`: rank 0 alone clears, writes and prints; --resume of a finished run is a no-op."""
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iat",
           "train", "--method", "uiat-fgsm", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
           "--batch-size", "32", "--val-size", "64", "--val-examples", "16", "--val-steps", "1", "--device", "cpu",
           "--no-progress", "--out", str(tmp_path)]
    for extra in ([], ["--overwrite"], ["--resume"]):
        done = subprocess.run(run + extra, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len([line for line in done.stdout.splitlines() if line.startswith('{"run"')]) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sharded_random_starts_are_slices_of_the_global_batch(norm):
    """Rank r of W draws rows [r*B, (r+1)*B) of the start one process of batch W*B draws."""
    from iat.attacks import PGD
    from iat.attacks.engine import noise_of_global_batch

    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    attack = PGD(eps=0.1 if norm == "linf" else 0.5, norm=norm)
    whole = attack.init_delta(x, torch.Generator().manual_seed(1))
    parts = []
    for rank in range(2):
        with noise_of_global_batch(rank, 2):
            parts.append(attack.init_delta(x[4 * rank:4 * rank + 4], torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat(parts), whole)



def test_a_rank_that_starts_after_rank_0_took_the_run_folder_follows_it(tmp_path, monkeypatch):
    """Ranks may start seconds apart (nodes of a multi-node job, a DDP cell's task waiting for task 0's plan):
    a rank > 0 that finds the folder locked by rank 0 and holding its new run's config.json follows rank 0 into
    training, instead of refusing the folder as in use or "started meanwhile by another process" (which left
    rank 0 waiting for a peer that had exited 2). tests/test_reproduce_slurm.py runs such a start for real."""
    import types

    from iat.training import run_dir, trainer

    out = tmp_path / "run"
    followed = []

    class Follower:  # a rank > 0 of a group it would join; here, what it was asked to do
        def __init__(self, cfg, o, *args):
            self.dist = types.SimpleNamespace(is_main=False)
            followed.append(o)

        def fit(self):
            return {"ok": 1}

    monkeypatch.setattr(trainer, "Trainer", Follower)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with run_dir.run_lock(out):  # rank 0, which has written its config.json
        out.mkdir()
        (out / "config.json").write_text("{}")
        assert run_dir.train(make_cfg("pgd-at"), out) == {"ok": 1} and followed == [out]
    monkeypatch.setenv("RANK", "0")  # rank 0 itself still refuses a folder that holds a run
    with pytest.raises(Exception, match="already holds a run"):
        run_dir.train(make_cfg("pgd-at"), out)
