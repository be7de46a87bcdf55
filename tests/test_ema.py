"""EMA of the weights (optim.ema_decay): the average itself, its checkpoints, its resume and its range."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from iat import config as C
from iat.cli import main
from iat.records import RunRecord, read_metrics
from iat.same_run import first_difference
from iat.runtime.checkpoint import load_checkpoint
from iat.training.ema import WeightEMA
from iat.training.trainer import Trainer
from test_resume import assert_same_run, crash_then_resume, die_at_step, tiny_cfg


def test_ema_after_k_steps_is_the_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    decay, k = 0.5, 14  # the warm-up (1 + n) / (10 + n) passes 0.5 at n = 8: both regimes are hit
    ema = WeightEMA(model, decay)
    expected = None
    for n in range(k):
        x = torch.randn(16, 3)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        ema.update(model)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        if expected is None:  # the first update copies the weights
            expected = weights
        else:
            d = min(decay, (1 + n) / (10 + n))
            expected = {name: d * expected[name] + (1 - d) * w for name, w in weights.items()}
    got = dict(ema.module.named_parameters())
    for name, w in expected.items():
        assert torch.allclose(got[name], w, rtol=1e-5, atol=1e-6), name
    now = dict(model.named_parameters())  # an average, not a copy (a bias before BatchNorm never moves)
    assert sum(not torch.allclose(got[name], now[name]) for name in now) >= 3
    for (name, b_ema), b_model in zip(ema.module.named_buffers(), model.buffers()):
        assert torch.equal(b_ema, b_model), f"buffer {name} is copied, not averaged"
    assert ema.updates == k and int(ema.averaged.n_averaged) == k


def ema_cfg(**optim) -> C.TrainConfig:
    return tiny_cfg(ema_decay=0.9, **optim)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema")
    trainer = Trainer(ema_cfg(), out)
    trainer.fit()
    final = load_checkpoint(out / "checkpoints" / "last-ema.safetensors")["model"]
    for key, value in trainer.ema.module.state_dict().items():
        assert torch.equal(final[key], value.cpu()), key
    return out


def test_off_by_default_writes_no_ema_files(tmp_path):
    assert C.TrainConfig().optim.ema_decay == 0.0
    Trainer(tiny_cfg(epochs=1), tmp_path).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    assert all(m.val_robust_ema is None for m in read_metrics(tmp_path / "metrics.jsonl"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["ema"] is None


def test_on_writes_ema_checkpoints_metrics_and_eval_accepts_them(ema_run, capsys):
    ckpt = ema_run / "checkpoints"
    assert {"best-ema.safetensors", "last-ema.safetensors"} <= {p.name for p in ckpt.iterdir()}
    lines = read_metrics(ema_run / "metrics.jsonl")
    assert all(0 <= m.val_natural_ema <= 1 and 0 <= m.val_robust_ema <= 1 for m in lines)
    best_epoch = max(lines, key=lambda m: (m.val_robust_ema, -m.epoch)).epoch  # the first of equals
    assert lines[-1].best_ema_epoch == best_epoch
    best = load_checkpoint(ckpt / "best-ema.safetensors")
    assert best["kind"] == "model" and best["progress"]["best_ema_epoch"] == best_epoch
    last, ema = load_checkpoint(ckpt / "last.safetensors"), load_checkpoint(ckpt / "last-ema.safetensors")
    assert any(not torch.equal(last["model"][k], ema["model"][k]) for k in last["model"]
               if last["model"][k].is_floating_point())  # the EMA file holds other weights than last
    assert main(["eval", str(ema_run), "--checkpoint", "last-ema", "--attacks", "natural", "--n-examples", "64",
                 "--no-progress"]) == 0
    result = json.loads((ema_run / "eval-last-ema.json").read_text())
    assert result["checkpoint_kind"] == "last-ema"
    report = ema_run.parent / f"{ema_run.name}-report"
    assert main(["report", str(ema_run), "--checkpoints", "last-ema", "--no-plots", "--out", str(report)]) == 0
    (row,) = json.loads((report / "report.json").read_text())["rows"]
    assert row["checkpoint"] == "last-ema" and row["epoch"] == 2
    assert row["acc"]["natural"] == result["results"][0]["accuracy"]


def test_resume_mid_run_is_bitwise_equal_for_weights_and_ema(tmp_path, ema_run, monkeypatch):
    trainer = Trainer(ema_cfg(), tmp_path)
    die_at_step(trainer, monkeypatch, 9)  # epoch 2, after its step-2 checkpoint
    crash_then_resume(trainer, ema_cfg, tmp_path)
    assert_same_run(ema_run, tmp_path)  # weights, optimizer, progress, metric lines (with the EMA's numbers)
    for name in ("last-ema", "best-ema"):
        a, b = (load_checkpoint(r / "checkpoints" / f"{name}.safetensors")["model"] for r in (ema_run, tmp_path))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_checkpoint(r / "checkpoints" / "last.safetensors")["ema"] for r in (ema_run, tmp_path))
    assert a["updates"] == b["updates"] == 12
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_decay_out_of_range_is_one_line_exit_2(tmp_path, value, capsys):
    assert main(["train", "--dataset", "synthetic", "--ema-decay", value, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.ema_decay" in err and "[0, 1)" in err
    assert not (tmp_path / "r").exists()


def test_ema_decay_is_part_of_the_run_identity():
    old = RunRecord(config=C.to_dict(tiny_cfg()))
    del old.config["optim"]["ema_decay"]  # a run recorded before the setting existed had no EMA
    assert first_difference(old, RunRecord(config=C.to_dict(tiny_cfg()))) is None
    assert first_difference(old, RunRecord(config=C.to_dict(ema_cfg()))) == \
        "config.optim.ema_decay would be 0.9 but was 0.0"


def test_metric_lines_without_ema_fields_still_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "lr": 0.1, "val_robust": 0.5}) + "\n")
    (line,) = read_metrics(path)
    assert line.val_robust == 0.5 and line.val_robust_ema is None and line.best_ema_epoch is None
