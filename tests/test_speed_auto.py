"""speed.compile = "auto" (with speed.layout = "auto"): on CPU false untimed; where compiled candidates are
timed (CUDA; here switched on, with torch.compile's "eager" backend so that TorchDynamo traces but nothing is
generated), the candidate with the least expected run time wins, a compiled one only if its saving pays for
its compile time, and one that fails to compile is dropped. Step times come from a fake clock that each real
step advances, so the choices are deterministic."""
import json

import pytest
import torch

from iat import config as C
from iat.data import load_dataset
from iat.errors import UsageError
from iat.records import RunRecord
from iat.same_run import first_difference
from iat.training import layout
from iat.training.trainer import Trainer

from speed_helpers import small_cfg

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
ALL = ["nchw", "channels_last", "nchw+compile", "channels_last+compile"]


def _cfg(**speed) -> C.TrainConfig:
    return small_cfg(1, **speed)


def _fit(tmp_path, **speed) -> tuple[Trainer, dict]:
    trainer = Trainer(_cfg(**speed), tmp_path, load_dataset("synthetic", n_train=96, n_test=16))
    trainer.fit()
    return trainer, json.loads((tmp_path / "config.json").read_text())


@pytest.fixture
def compiled_timed(monkeypatch):
    """Compiled candidates timed on this CPU, through TorchDynamo with the "eager" backend."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{"backend": "eager", **kw}))
    monkeypatch.setattr(layout, "compile_is_timed", lambda device: True)
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    monkeypatch.setattr(layout, "MIN_COMPILE_RUN_SECONDS", 0)
    torch._dynamo.reset()
    yield real
    torch._dynamo.reset()


class FakeClock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def _step_seconds(monkeypatch, seconds: dict[str, float], compile_s: float = 0.0, fail: tuple[str, ...] = ()):
    """Every candidate's real step runs (copies train, compiled ones through torch.compile), then advances a
    fake clock by seconds[name]; a compiled one's first step also by compile_s; a name in `fail` raises."""
    clock = FakeClock()
    monkeypatch.setattr(layout, "clock", clock)
    real = layout._candidate

    def candidate(trainer, layout_name, compiled):
        step, name, calls = real(trainer, layout_name, compiled), layout_name + ("+compile" if compiled else ""), []

        def timed():
            if name in fail:
                raise RuntimeError(f"{name} cannot compile here")
            out = step()
            clock.t += seconds[name] + (compile_s if compiled and not calls else 0.0)
            calls.append(1)
            return out
        return timed

    monkeypatch.setattr(layout, "_candidate", candidate)


# ----------------------------------------------------------------- CPU: compile auto is false, untimed
def test_cpu_auto_times_the_layouts_only_and_records_why_compile_is_false(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    trainer, saved = _fit(tmp_path)
    about = saved["speed_auto"]
    assert about["timed"] and set(about["seconds_per_step"]) == {"nchw", "channels_last"}
    assert saved["config"]["speed"]["compile"] is False and about["compile"] is False
    assert "cpu" in about["compile_reason"] and "untimed" in about["compile_reason"]
    assert about["auto"] == ["layout", "compile"] and not about["compile_warmup_seconds"]
    assert not isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iat: speed.layout auto")]
    assert len(line) == 1 and "speed.compile auto -> false" in line[0] and "rarely wins" in line[0]


def test_cpu_auto_with_a_set_layout_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "MIN_RUN_STEPS", 0)
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("nothing to time"))
    _, saved = _fit(tmp_path, layout="channels_last")
    about = saved["speed_auto"]
    assert saved["config"]["speed"] == {"amp": "none", "layout": "channels_last", "compile": False}
    assert about["timed"] is False and about["auto"] == ["compile"] and "cpu" in about["compile_reason"]
    assert "speed.compile auto -> false" in layout.describe(about)


@pytest.mark.parametrize("speed,device,names", [
    ({}, CUDA, ALL), ({}, CPU, ALL[:2]), ({"compile": False}, CUDA, ALL[:2]), ({"compile": True}, CPU, ALL[2:]),
    ({"layout": "nchw"}, CUDA, ["nchw", "nchw+compile"]), ({"layout": "nchw", "compile": True}, CUDA, ["nchw+compile"])])
def test_the_candidates_are_what_the_config_leaves_open(speed, device, names):
    assert layout.candidates(C.SpeedConfig(**speed), device)[0] == names


# ----------------------------------------------------------------- compiled candidates timed
@pytest.mark.parametrize("fastest", ALL)
def test_the_smallest_median_wins(tmp_path, monkeypatch, compiled_timed, fastest):
    _step_seconds(monkeypatch, {name: 0.01 if name == fastest else 1.0 for name in ALL})
    trainer, saved = _fit(tmp_path)
    about, chosen = saved["speed_auto"], layout.parts(fastest)
    assert about["choice"] == fastest and about["seconds_per_step"][fastest] == pytest.approx(0.01)
    assert set(about["seconds_per_step"]) == set(ALL) and not about["dropped"]
    assert set(about["compile_warmup_seconds"]) == {"nchw+compile", "channels_last+compile"}
    assert (saved["config"]["speed"]["layout"], saved["config"]["speed"]["compile"]) == chosen
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) is chosen[1]
    assert ("compile kept" in about["compile_reason"]) is chosen[1]


def test_compile_is_not_kept_when_its_saving_does_not_pay_for_compiling(tmp_path, monkeypatch, compiled_timed,
                                                                       capsys):
    _step_seconds(monkeypatch, {"nchw": 1.0, "channels_last": 0.9, "nchw+compile": 0.5, "channels_last+compile": 0.4},
                  compile_s=60.0)  # 2 steps x 0.5 s saved < 60 s of compiling
    trainer, saved = _fit(tmp_path)
    about = saved["speed_auto"]
    assert about["choice"] == "channels_last" and saved["config"]["speed"]["compile"] is False
    assert about["compile_warmup_seconds"]["channels_last+compile"] == pytest.approx(60 + 0.4 * layout.COMPILE_WARMUP)
    assert about["compile_reason"].startswith("compile not kept") and about["run_steps"] == trainer.total_steps
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iat: speed.layout auto")]
    assert len(line) == 1 and "channels_last+compile 400.0 ms (64.0 s to compile)" in line[0]
    assert "speed.compile auto -> false" in line[0] and "compile not kept" in line[0]


def test_a_run_too_short_to_pay_for_compiling_times_the_layouts_only(tmp_path, monkeypatch, compiled_timed):
    monkeypatch.setattr(layout, "MIN_COMPILE_RUN_SECONDS", 2.5)  # 2 steps of the fastest eager 1.2 s: 2.4 s
    _step_seconds(monkeypatch, {"nchw": 1.3, "channels_last": 1.2}, fail=("nchw+compile", "channels_last+compile"))
    timed, real = [], layout.time_candidates
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: timed.append(names) or real(trainer, names))
    _, saved = _fit(tmp_path)
    about = saved["speed_auto"]
    assert timed == [["nchw", "channels_last"]] and about["choice"] == "channels_last" and not about["dropped"]
    assert "2 s, too short to pay for compiling" in about["compile_reason"]
    monkeypatch.setattr(layout, "MIN_COMPILE_RUN_SECONDS", 2.3)  # long enough: the eager ones are timed again
    timed.clear()
    _fit(tmp_path / "long")
    assert timed == [["nchw", "channels_last"], ALL]


def test_the_cost_rule_compares_the_saving_over_the_steps_left_with_the_compile_seconds():
    def about(compile_s):
        return {"seconds_per_step": {"nchw": 1.0, "nchw+compile": 0.5}, "compile_warmup_seconds":
                {"nchw+compile": compile_s}, "run_steps": 100, "dropped": {}}
    assert layout.choose(about(49.0), compile_auto=True) == "nchw+compile"  # saves 50 s, costs 49
    assert layout.choose(about(51.0), compile_auto=True) == "nchw"
    assert layout.choose(about(51.0), compile_auto=False) == "nchw+compile"  # compile set: the median decides


def test_a_candidate_that_fails_to_compile_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, compiled_timed):
    def broken(graph, inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled_timed(model, backend=broken))
    _, saved = _fit(tmp_path)
    about = saved["speed_auto"]
    assert set(about["dropped"]) == {"nchw+compile", "channels_last+compile"}
    assert all("no compiler on this machine" in why for why in about["dropped"].values())
    assert set(about["seconds_per_step"]) == {"nchw", "channels_last"} and not about["compile_warmup_seconds"]
    assert saved["config"]["speed"]["compile"] is False and "every compiled candidate failed" in about["compile_reason"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1


def test_one_failing_candidate_leaves_the_others(tmp_path, monkeypatch, compiled_timed):
    _step_seconds(monkeypatch, {"nchw": 1.0, "channels_last": 0.9, "nchw+compile": 0.01, "channels_last+compile": 0.02},
                  fail=("nchw+compile",))
    _, saved = _fit(tmp_path)
    about = saved["speed_auto"]
    assert about["choice"] == "channels_last+compile" and list(about["dropped"]) == ["nchw+compile"]
    assert "RuntimeError: nchw+compile cannot compile here" in layout.describe(about)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_set_compile_is_respected_and_only_the_layout_is_chosen(tmp_path, monkeypatch, compiled_timed, compiled):
    seconds = {"nchw": 0.5, "channels_last": 0.4, "nchw+compile": 0.2, "channels_last+compile": 0.1}
    _step_seconds(monkeypatch, seconds, compile_s=1000.0)  # a set compile = true pays no cost rule
    trainer, saved = _fit(tmp_path, compile=compiled)
    about = saved["speed_auto"]
    assert about["auto"] == ["layout"] and "compile_reason" not in about
    assert about["choice"] == ("channels_last+compile" if compiled else "channels_last")
    assert len(about["seconds_per_step"]) == 2 and saved["config"]["speed"]["compile"] is compiled
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) is compiled
    assert "speed.compile" not in layout.describe(about)


def test_compile_true_that_fails_everywhere_is_a_clear_error(tmp_path, monkeypatch, compiled_timed):
    _step_seconds(monkeypatch, {}, fail=("nchw+compile", "channels_last+compile"))
    with pytest.raises(UsageError, match="speed.compile = true failed"):
        _fit(tmp_path, compile=True)


def test_a_resume_reuses_the_recorded_compile_without_timing(tmp_path, monkeypatch, compiled_timed):
    _step_seconds(monkeypatch, {name: 0.01 if name == "nchw+compile" else 1.0 for name in ALL})
    cfg = _cfg()
    cfg.optim.epochs = 2
    Trainer(cfg, tmp_path, load_dataset("synthetic", n_train=96, n_test=16)).fit()
    first = json.loads((tmp_path / "config.json").read_text())
    assert first["config"]["speed"]["compile"] is True
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("resume must not time"))
    again = Trainer(cfg, tmp_path, load_dataset("synthetic", n_train=96, n_test=16))
    again.resume()
    assert (again.cfg.speed.layout, again.cfg.speed.compile) == ("nchw", True)
    assert isinstance(again.train_model, torch._dynamo.eval_frame.OptimizedModule)
    again.fit()
    assert json.loads((tmp_path / "config.json").read_text())["speed_auto"] == first["speed_auto"]


# ----------------------------------------------------------------- old records, the command line
def _old_record(compile_: bool = False) -> dict:
    config = C.to_dict(_cfg())
    return {"config": {**config, "speed": {"amp": "none", "layout": "nchw", "compile": compile_}}, "version": 2,
            "layout_auto": {"choice": "nchw", "timed": False, "reason": "a run of 2 steps is too short to time"}}


def test_an_old_record_loads_and_is_the_same_run_as_compile_auto():
    record = RunRecord.from_dict(_old_record())
    assert record.speed_auto["choice"] == "nchw" and not hasattr(record, "layout_auto")
    assert first_difference(record, RunRecord(config=C.to_dict(_cfg()))) is None  # auto matches what it ran
    assert first_difference(record, RunRecord(config=C.to_dict(_cfg(compile=False)))) is None
    assert "speed.compile" in first_difference(record, RunRecord(config=C.to_dict(_cfg(compile=True))))
    assert C.from_dict(record.config).speed.compile is False  # a bool in config.json loads as it is


def test_iat_train_resume_of_an_old_config_json_with_compile_false(tmp_path, monkeypatch):
    from iat.cli import main

    out = tmp_path / "run"
    argv = ["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size",
            "64", "--steps", "1", "--val-examples", "16", "--no-progress", "--out", str(out)]
    assert main(argv + ["--set", "speed.compile=false"]) == 0  # compile's old default; layout auto (untimed)
    record = json.loads((out / "config.json").read_text())
    assert record["speed_auto"]["auto"] == ["layout"]
    about = record.pop("speed_auto")
    record["layout_auto"] = {k: about[k] for k in ("choice", "timed", "reason")}  # as iat wrote it before compile auto
    (out / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(layout, "time_candidates", lambda trainer, names: pytest.fail("resume must not time"))
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "config.json").read_text())
    assert again["config"]["speed"] == {"amp": "none", "layout": "nchw", "compile": False}
    assert again["speed_auto"]["choice"] == "nchw" and "layout_auto" not in again


@pytest.mark.parametrize("text,value", [("auto", "auto"), ("AUTO", "auto"), ("true", True), ("false", False),
                                        (True, True), (False, False)])
def test_speed_compile_parses_auto_true_and_false(text, value):
    assert C.set_path(C.TrainConfig(), "speed.compile", text).speed.compile == value
    assert C.TrainConfig().speed.compile == "auto"


@pytest.mark.parametrize("flags,value", [(["--set", "speed.compile=auto"], "auto"), (["--set", "speed.compile=true"],
                                          True), (["--speed-compile", "false"], False), ([], "auto")])
def test_the_command_line_sets_speed_compile(tmp_path, flags, value):
    from iat.cli import build_parser
    from iat.cli.commands import train_config

    cfg, _ = train_config(build_parser().parse_args(["train", *flags, "--out", str(tmp_path / "r")]))
    assert cfg.speed.compile == value and type(cfg.speed.compile) is type(value)


def test_a_bad_speed_compile_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="speed.compile must be auto, true or false"):
        C.set_path(C.TrainConfig(), "speed.compile", "sometimes")
    cfg = _cfg()
    cfg.speed.compile = "yes please"  # set in Python, past the coercer
    with pytest.raises(UsageError, match="speed.compile must be auto, true or false"):
        Trainer(cfg, tmp_path, load_dataset("synthetic", n_train=96, n_test=16))
