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

from speed_helpers import small_cfg


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
    return small_cfg(2, **speed)


@pytest.mark.parametrize("speed", [{"amp": "bf16", "layout": "channels_last"}, {"amp": "fp16"}])
def test_speed_options_train_and_are_recorded(tmp_path, speed):
    trainer = Trainer(_cfg(**speed), tmp_path, load_dataset("synthetic", n_train=96, n_test=16))
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())["config"]["speed"]
    assert saved == {"amp": "none", "layout": "nchw", "compile": False, **speed}  # a short run: auto -> nchw
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


# ----------------------------------------------------------------- speed.layout = "auto"
from iat.records import RunRecord  # noqa: E402
from iat.same_run import first_difference  # noqa: E402
from iat.training import layout, speed as S  # noqa: E402


def _data():
    return load_dataset("synthetic", n_train=96, n_test=16)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _rigged(monkeypatch, fastest):
    """Time for real (the copies train, the generators are used), then report `fastest` as the faster."""
    real = layout.time_candidates

    def rigged(trainer, names):
        measured = real(trainer, names)
        seconds = measured["seconds_per_step"]
        return {**measured, "seconds_per_step": {name: (1e-3 if name == fastest else 1.0) * max(seconds.values())
                                                 for name in seconds}}

    monkeypatch.setattr(layout, "time_candidates", rigged)


def test_auto_times_both_layouts_and_records_the_fastest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    trainer = Trainer(_cfg(), tmp_path, _data())
    assert trainer.cfg.speed.layout == "auto" and trainer.train_model is None
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    about = saved["speed_auto"]
    assert about["timed"] and set(about["seconds_per_step"]) == set(layout.EXACT)
    assert all(v > 0 for v in about["seconds_per_step"].values())
    fastest = min(about["seconds_per_step"], key=about["seconds_per_step"].get)
    assert saved["config"]["speed"]["layout"] == about["choice"] == fastest
    line = [ln for ln in capsys.readouterr().out.splitlines() if "speed.layout auto" in ln]
    assert len(line) == 1 and f"-> {fastest}" in line[0] and "nchw" in line[0] and "channels_last" in line[0]


def test_a_short_run_takes_nchw_without_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("a short run must not time"))
    trainer = Trainer(_cfg(), tmp_path, _data())
    trainer.fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["speed"]["layout"] == "nchw" and saved["speed_auto"]["timed"] is False


@pytest.mark.parametrize("chosen", layout.EXACT)
def test_auto_choice_trains_the_same_weights_as_that_layout_set_explicitly(tmp_path, monkeypatch, chosen):
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    _rigged(monkeypatch, chosen)
    auto = Trainer(_cfg(), tmp_path / "auto", _data())
    auto.fit()
    assert auto.cfg.speed.layout == chosen
    explicit = Trainer(_cfg(layout=chosen), tmp_path / "explicit", _data())
    explicit.fit()
    a, b = _weights(auto), _weights(explicit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert next(auto.model.parameters()).is_contiguous(memory_format=S.memory_format(explicit.cfg.speed))


def test_resume_reuses_the_recorded_layout_without_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    _rigged(monkeypatch, "channels_last")  # not the default, so a resume that ignored the record would differ
    cfg = _cfg()
    cfg.optim.epochs = 2
    Trainer(cfg, tmp_path, _data()).fit()
    first = json.loads((tmp_path / "config.json").read_text())
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("resume must not time again"))
    again = Trainer(cfg, tmp_path, _data())  # the caller's cfg still says "auto"
    assert cfg.speed.layout == "auto"
    again.resume()
    assert again.cfg.speed.layout == "channels_last" and again.speed_auto == first["speed_auto"]
    again.fit()
    assert json.loads((tmp_path / "config.json").read_text())["speed_auto"] == first["speed_auto"]


def test_iat_train_resume_keeps_the_layout_and_its_timings(tmp_path, monkeypatch):
    from iat.cli import main

    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    _rigged(monkeypatch, "channels_last")
    out = str(tmp_path / "run")
    assert main(["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
                 "--batch-size", "64", "--steps", "1", "--val-examples", "16", "--no-progress", "--out", out]) == 0
    first = json.loads((tmp_path / "run" / "config.json").read_text())
    assert first["config"]["speed"]["layout"] == "channels_last" and first["speed_auto"]["timed"]
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("resume must not time again"))
    assert main(["train", "--resume", out, "--no-progress"]) == 0
    again = json.loads((tmp_path / "run" / "config.json").read_text())
    assert again["config"]["speed"] == first["config"]["speed"] and again["speed_auto"] == first["speed_auto"]


def test_a_version_1_record_upgrades_and_stays_the_same_run():
    config = C.to_dict(_cfg())
    old = {"config": {**config, "speed": {"amp": "none", "channels_last": False, "compile": False}}, "version": 1}
    record = RunRecord.from_dict(old)
    assert record.version == 2 and record.config["speed"] == {"amp": "none", "layout": "nchw", "compile": False}
    assert first_difference(record, RunRecord(config=config)) is None  # "auto" matches what the old run used
    assert first_difference(record, RunRecord(config=C.to_dict(_cfg(layout="nchw")))) is None
    assert "speed.layout" in first_difference(record, RunRecord(config=C.to_dict(_cfg(layout="channels_last"))))


def test_an_old_channels_last_key_points_at_layout():
    with pytest.raises(UsageError, match="speed.layout"):
        C.set_path(C.TrainConfig(), "speed.channels_last", "true")


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512f", None), ("avx512_bf16 amx_bf16 amx_tile", "AMX"),
                                            ("avx512f avx512_bf16", "AVX-512 BF16")])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    found = S.native_bf16(torch.device("cpu"), info)
    assert found == expected if expected is None else expected in found


def test_the_bf16_hint_names_the_cost_benchmark_only_for_fp32_runs(monkeypatch):
    monkeypatch.setattr(S, "native_bf16", lambda device: "AMX")
    hint = S.bf16_hint(torch.device("cpu"), C.SpeedConfig())
    assert "AMX" in hint and "speed_option_strength.py" in hint and "\n" not in hint
    assert S.bf16_hint(torch.device("cpu"), C.SpeedConfig(amp="bf16")) is None
    monkeypatch.setattr(S, "native_bf16", lambda device: None)
    assert S.bf16_hint(torch.device("cpu"), C.SpeedConfig()) is None
