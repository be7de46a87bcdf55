"""Runs survive faults: SIGKILL mid-epoch then --resume gives the same bits; NaN keeps the last good checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iat import config as C
from iat.runtime.checkpoint import load_checkpoint
from iat.cli import main
from iat.errors import UsageError
from iat.training.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 12 batches an epoch; a checkpoint every 2 batches, so kills land between mid-epoch checkpoints.
RUN = ["--method", "iat", "--dataset", "synthetic", "--model", "cnn", "--epochs", "3", "--batch-size", "32",
       "--val-size", "128", "--steps", "2", "--val-steps", "2", "--val-examples", "64", "--seed", "3",
       "--device", "cpu", "--checkpoint-every", "2", "--no-progress"]
TIMING = ("epoch_seconds", "images_per_second")


def run_iat(*args: str, **kw) -> subprocess.Popen:
    # One thread: the same kernels run in both processes, and the test shares its CPU politely.
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "iat", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise equal weights and optimizer state, the same best checkpoint and the same metric lines."""
    for name in ("last", "best"):
        sa, sb = (load_checkpoint(r / "checkpoints" / f"{name}.safetensors") for r in (a, b))
        assert sa["model"].keys() == sb["model"].keys()
        for key in sa["model"]:
            assert torch.equal(sa["model"][key], sb["model"][key]), f"{name}: {key} differs"
        pa, pb = ({k: v for k, v in s["progress"].items() if k != "elapsed"} for s in (sa, sb))
        assert pa == pb
    oa, ob = (load_checkpoint(r / "checkpoints" / "last.safetensors")["optimizer"]["state"] for r in (a, b))
    assert all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)
    assert metrics(a) == metrics(b)


def wait_for_mid_epoch_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    """Poll last.safetensors (replaced atomically, so always readable) until it is a mid-epoch one."""
    path, deadline = run / "checkpoints" / "last.safetensors", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            progress = load_checkpoint(path)["progress"]
            if progress["epoch"] >= 1 and progress["step"] > 0:
                return progress
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no mid-epoch checkpoint appeared (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = run_iat("train", *RUN, "--out", str(whole))
    proc = run_iat("train", *RUN, "--out", str(killed))
    wait_for_mid_epoch_checkpoint(killed, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    at_kill = load_checkpoint(killed / "checkpoints" / "last.safetensors")["progress"]
    assert at_kill["epoch"] < 3, "the run finished before it could be killed"
    # A kill during an append leaves a torn last line; resuming must shrug it off.
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')
    resumed = run_iat("train", "--resume", str(killed))  # config.json supplies every setting
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 3
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    assert_same_run(whole, killed)
    assert [r["epoch"] for r in metrics(killed)] == [1, 2, 3]


# ----------------------------------------------------------------- in-process faults, cheaper to aim

def tiny_cfg(**optim) -> C.TrainConfig:
    cfg = C.TrainConfig(method="pgd-at", model="cnn", seed=1, device="cpu", checkpoint_every_steps=2,
                        progress=False)
    C.update(cfg, {"data": {"name": "synthetic", "val_size": 128}, "optim": {"epochs": 2, "batch_size": 64, **optim},
                   "threat": {"steps": 1}, "val": {"steps": 1, "n_examples": 64}})
    return cfg


class Crash(Exception):
    """Stands in for a kill at a chosen point."""


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    Trainer(tiny_cfg(), out).fit()
    return out


def die_at_step(trainer: Trainer, monkeypatch, global_step: int) -> None:
    """The trainer raises Crash when it reaches `global_step` (a kill between two steps)."""
    step = trainer.train_step

    def dying_step(x, y):
        if trainer.progress.global_step == global_step:
            raise Crash
        return step(x, y)

    monkeypatch.setattr(trainer, "train_step", dying_step)


def crash_then_resume(trainer: Trainer, make_cfg, out: Path) -> None:
    """Run `trainer` into its Crash, then resume the run in a fresh Trainer and finish it."""
    with pytest.raises(Crash):
        trainer.fit()
    again = Trainer(make_cfg(), out)
    again.resume()
    again.fit()


@pytest.mark.parametrize("where", ["mid-epoch", "after-metrics-before-checkpoint"])
def test_crash_points_resume_to_the_same_run(tmp_path, reference_run, where, monkeypatch):
    trainer = Trainer(tiny_cfg(), tmp_path)
    if where == "mid-epoch":  # 6 batches an epoch: dies in batch 4 of epoch 2, after the step-2 checkpoint
        die_at_step(trainer, monkeypatch, 9)
    else:  # epoch 1's metric line (and maybe best) written, its checkpoint not
        save = trainer.save

        def dying_save():
            if trainer.progress.step == 0:
                raise Crash
            save()

        monkeypatch.setattr(trainer, "save", dying_save)
    crash_then_resume(trainer, tiny_cfg, tmp_path)
    assert_same_run(reference_run, tmp_path)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(), tmp_path)
    loss = trainer.method.loss

    def poisoned(model, x, y):  # finite through epoch 1, NaN from batch 3 of epoch 2 on
        value, metrics = loss(model, x, y)
        return (value * float("nan"), metrics) if trainer.progress.global_step >= 8 else (value, metrics)

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    with pytest.raises(UsageError, match=r"non-finite loss at epoch 2, step 3"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 2)
    assert all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point())
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]


def test_huge_learning_rate_is_one_line_error_naming_epoch_and_step(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
            "--batch-size", "64", "--val-size", "128", "--val-examples", "64", "--lr", "1e30",
            "--checkpoint-every", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite" in err and "epoch 1, step" in err
    last = out / "checkpoints" / "last.safetensors"
    if last.exists():  # the checkpoints kept are the good ones
        weights = load_checkpoint(last)["model"].values()
        assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


# ----------------------------------------------------------------- the --resume command line

def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(reference_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    return run


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "5"], "config.optim.epochs would be 5"),
    (["--lr", "0.5"], "config.optim.lr"),
    (["--model", "cnn4"], "config.model"),
    (["-O", "beta=2"], "no option beta"),          # pgd-at has no beta: refused as usual
    (["--overwrite"], "pass only one"),
    (["--out", "elsewhere"], "different run directories"),
])
def test_resume_refuses_contradicting_flags(finished_run, extra, message, capsys):
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert snapshot(finished_run) == before


def test_resume_accepts_settings_that_do_not_change_the_arithmetic(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--device", "cpu", "--checkpoint-every", "5",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2
    assert snapshot(finished_run)["checkpoints/last.safetensors"] == before["checkpoints/last.safetensors"]


def test_old_spelling_out_with_bare_resume_still_works(finished_run, capsys):
    assert main(["train", "--out", str(finished_run), "--resume", "--method", "pgd-at"]) == 0


def test_resume_before_the_first_checkpoint_starts_over(finished_run, capsys):
    shutil.rmtree(finished_run / "checkpoints")
    (finished_run / "metrics.jsonl").write_text('{"epoch": 1, "tor')
    assert main(["train", "--resume", str(finished_run)]) == 0
    assert "starting the run from the beginning" in capsys.readouterr().err
    assert [r["epoch"] for r in metrics(finished_run)] == [1, 2]


def test_resume_of_nothing_is_an_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main(["train", "--epochs", "1"]) == 2
    assert "--out RUN_DIR" in capsys.readouterr().err


def test_a_second_train_into_a_running_run_directory_is_refused(tmp_path, capsys):
    """iat 0.1: two `iat train` into one --out both exited 0 and mixed their metrics.jsonl and checkpoints."""
    from iat.training.run_dir import lock_path, run_lock

    out = tmp_path / "run"
    args = ["train", "--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
            "--val-examples", "16", "--no-progress", "--out", str(out)]
    with run_lock(out):  # a run in progress holds the lock
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err
        assert not out.exists()
    assert main(args) == 0  # released when the holder ends
    assert not lock_path(out).exists()  # and its file removed


TINY = ["train", "--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "2",
        "--val-examples", "16", "--no-progress"]


def test_overwrite_removes_exactly_what_iat_wrote(tmp_path, capsys):
    """iat 0.1 left the old run's eval-best.{json,csv,md} beside the new run."""
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    for name in ("eval-best.json", "eval-best.csv", "eval-best.md", "eval-best-eps-sweep.png", "notes.txt"):
        (out / name).write_text("old")
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "notes.txt"]


def test_a_folder_with_only_metric_lines_is_not_appended_to(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert main([*TINY, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_sigterm_ends_like_ctrl_c_with_one_line(tmp_path):
    proc = run_iat("train", *RUN, "--out", str(tmp_path / "run"))
    wait_for_mid_epoch_checkpoint(tmp_path / "run", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("iat: interrupted") and "--resume" in err


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    import errno

    from iat.runtime import checkpoint

    out = tmp_path / "run"
    real, calls = checkpoint.atomic_write_bytes, []

    def filling_up(path, data):
        calls.append(path)
        if len(calls) > 2:  # epoch 1's best and last are written; epoch 2's first write finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", filling_up)
    assert main([*TINY, "--out", str(out)]) == 2  # a full disk is the user's to fix: the path and what to do
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "free some space" in err
    assert "/run/checkpoints/" in err
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert state["progress"]["epoch"] == 1  # the previous checkpoint, whole
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_diverging_run_without_a_checkpoint_does_not_claim_one_was_kept(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
            "--batch-size", "64", "--val-size", "128", "--val-examples", "64", "--lr", "1e30", "--no-progress",
            "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "no checkpoint had been written yet" in err
    assert not (out / "checkpoints" / "last.safetensors").exists()
