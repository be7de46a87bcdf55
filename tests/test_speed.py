"""Speed options: mixed precision never lets a perturbation leave the eps-ball or [0, 1]; the options run
end to end and are recorded in the run's config."""
import json

import pytest
import torch

from iat import config as C
from iat.attacks import PGD
from iat.data import load_dataset
from iat.errors import UsageError
from iat.training.trainer import Trainer


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("descent", [False, True])
def test_bf16_autocast_keeps_examples_in_the_ball(tiny_model, batch, norm, eps, descent):
    x, y = batch
    x_before = x.clone()
    attack = PGD(eps=eps, step_size=eps / 3, steps=4, norm=norm, descent=descent)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
    assert torch.equal(x, x_before)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert (size > 0).any()


def _cfg(**speed) -> C.TrainConfig:
    cfg = C.TrainConfig(method="pgd-at", model="cnn", device="cpu", progress=False)
    cfg.data = C.DataConfig(name="synthetic", val_size=32)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant")
    cfg.threat = C.ThreatModel(steps=2)
    cfg.val = C.ValConfig(steps=1, n_examples=16, batch_size=16)
    C.update(cfg, {"speed": speed})
    return cfg


@pytest.mark.parametrize("speed", [{"amp": "bf16", "channels_last": True}, {"amp": "fp16"}])
def test_speed_options_train_and_are_recorded(tmp_path, speed):
    trainer = Trainer(_cfg(**speed), tmp_path, load_dataset("synthetic", n_train=96, n_test=16))
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())["config"]["speed"]
    assert saved == {"amp": "none", "channels_last": False, "compile": False, **speed}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(v == v for v in record["train"].values())  # finite (not NaN) metrics
    if speed["amp"] == "fp16":
        assert trainer.scaler.is_enabled()


def test_bad_amp_value_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="speed.amp"):
        Trainer(_cfg(amp="fp8"), tmp_path, load_dataset("synthetic", n_train=96, n_test=16))


@pytest.mark.parametrize("method", ["pgd-at", "iat", "uiat-fgsm"])
def test_compile_trains_like_eager(tmp_path, monkeypatch, method):
    """speed.compile=true goes through torch.compile (TorchDynamo tracing, guards, recompiles when attacks
    flip requires_grad) and trains the same weights as eager mode. The "aot_eager" backend traces exactly
    as inductor does but skips code generation, which takes a minute on CPU (inductor itself ran here:
    `iat train ... --set speed.compile=true`)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    weights = {}
    for compiled in (False, True):
        cfg = _cfg(compile=compiled)
        cfg.method = method
        trainer = Trainer(cfg, tmp_path / str(compiled), load_dataset("synthetic", n_train=96, n_test=16))
        trainer.fit()
        saved = json.loads((tmp_path / str(compiled) / "config.json").read_text())["config"]["speed"]
        assert saved["compile"] is compiled
        assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) is compiled
        weights[compiled] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # TorchDynamo really traced graphs
    assert weights[True].keys() == weights[False].keys()
    for key in weights[False]:
        torch.testing.assert_close(weights[True][key], weights[False][key], rtol=1e-4, atol=1e-5)
