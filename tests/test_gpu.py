"""CUDA tests (mark `gpu`; skipped without CUDA; scripts/gpu_check.py runs them with `pytest -m gpu`):
every speed option trains and evaluates, speed auto times compiled candidates with inductor and records its
choice, the fp16 GradScaler scales, generators on CUDA, DDP with NCCL in one process, AutoAttack on CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iat import config as C
from iat.attacks import PGD, create_attack
from iat.evaluation.pipeline import EvalConfig, evaluate_checkpoint
from iat.training.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SRC = str(Path(__file__).resolve().parents[1] / "src")
OPTIONS = {"fp32": {}, "bf16": {"amp": "bf16"}, "fp16": {"amp": "fp16"}, "channels_last": {"layout": "channels_last"},
           "bf16+channels_last": {"amp": "bf16", "layout": "channels_last"}, "compile": {"compile": True},
           "bf16+channels_last+compile": {"amp": "bf16", "layout": "channels_last", "compile": True}}


def _cfg(method: str = "pgd-at", **speed) -> C.TrainConfig:
    cfg = C.TrainConfig(method=method, model="cnn4", device="cuda", progress=False)
    cfg.data = C.DataConfig(name="synthetic", val_size=64)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=64, lr=0.05, schedule="constant")
    cfg.threat = C.ThreatModel(steps=3)
    cfg.val = C.ValConfig(steps=2, n_examples=64, batch_size=64)
    C.update(cfg, {"speed": speed})
    return cfg


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_speed_option_trains_and_evaluates_on_cuda(tmp_path, option):
    trainer = Trainer(_cfg(**OPTIONS[option]), tmp_path)  # the registered synthetic set, as iat eval loads it
    assert next(trainer.model.parameters()).is_cuda
    trainer.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(v == v for v in line["train"].values()) and line["val_natural"] is not None
    saved = json.loads((tmp_path / "config.json").read_text())["config"]["speed"]
    assert {k: saved[k] for k in OPTIONS[option]} == OPTIONS[option]
    record = evaluate_checkpoint(str(tmp_path), EvalConfig(attacks="natural,pgd20", n_examples=64, progress=False,
                                                           dataset="synthetic", device="cuda"))
    assert {r["attack"] for r in record.results} >= {"natural", "pgd20"}
    assert record.device.startswith("cuda")


def test_speed_auto_times_compiled_candidates_and_records_a_choice_on_cuda(tmp_path, monkeypatch):
    """layout and compile "auto" in a short run (the timing switched on for it): every layout is timed eager
    and under torch.compile (inductor, the real backend), and the choice recorded is what trained."""
    from iat.training import layout

    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    monkeypatch.setattr(layout, "MIN_COMPILE_RUN_SECONDS", 0)
    torch._dynamo.reset()
    trainer = Trainer(_cfg(), tmp_path)
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    about, chosen = saved["speed_auto"], saved["config"]["speed"]
    assert about["timed"] and about["auto"] == ["layout", "compile"]
    assert set(about["seconds_per_step"]) | set(about["dropped"]) == {
        "nchw", "channels_last", "nchw+compile", "channels_last+compile"}
    assert all(s > 0 for s in about["compile_warmup_seconds"].values()) and about["compile_reason"]
    assert isinstance(chosen["compile"], bool) and (chosen["layout"], chosen["compile"]) == layout.parts(about["choice"])
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) is chosen["compile"]
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(v == v for v in line["train"].values())


def test_fp16_grad_scaler_scales_and_is_checkpointed(tmp_path):
    trainer = Trainer(_cfg(amp="fp16"), tmp_path)
    trainer.fit()
    assert trainer.scaler.is_enabled()
    scale = trainer.scaler.get_scale()
    assert 0 < scale < float("inf")
    from iat.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["scaler"]["scale"] == scale


def test_generators_on_cuda_fix_the_attack(tmp_path):
    torch.manual_seed(0)
    from iat.models import create_model

    model = create_model("cnn4", num_classes=10, in_channels=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3).cuda()
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    attack = PGD(eps=8 / 255, step_size=2 / 255, steps=3)
    runs = [attack(model, x, y, generator=torch.Generator(device="cuda").manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert (runs[0] - x).abs().max() <= 8 / 255 + 1e-6


def test_ddp_with_nccl_in_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "iat", "train",
           "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64",
           "--steps", "2", "--val-examples", "64", "--device", "cuda", "--no-progress", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 1
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def test_autoattack_on_cuda():
    pytest.importorskip("autoattack")
    torch.manual_seed(0)
    from iat.models import create_model

    model = create_model("cnn4", num_classes=10, in_channels=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3).cuda()
    model.eval()
    x, y = torch.rand(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    x_adv = create_attack("autoattack", eps=8 / 255)(model, x, y)
    assert x_adv.is_cuda and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
