"""Fuzzing the command line's input handling with hypothesis: any value for any `iat train` flag, any
method option, any config file text ends with exit status 0 or 2, at most two lines on stderr, no
traceback, and an existing run directory byte-for-byte unchanged. Training itself is replaced by a stub
(fit), so what is fuzzed is every check made before work starts. IAT_SLOW=1 runs many more examples."""
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iat.cli import main
from iat.cli import build_parser
from iat.training import trainer as trainer_mod

EXAMPLES = 400 if os.environ.get("IAT_SLOW") == "1" else 40
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BASE = ["train", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--no-progress"]

build_parser()  # fills DESTS
TRAIN_FLAGS = sorted({a for a in build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
                      if a.startswith("--") and a not in ("--help", "--resume", "--overwrite", "--out", "--config")})
ODD = ["", "0", "-0", "-1", "1e400", "-1e400", "nan", "inf", "8/0", "8/255", "1e30", "2**63", "0.5", "true",
       "none", "abc", "cnn", "pgd-at", "1,2", "[1]", "\u00e9\u00e8", "9" * 40, " ", "=", "linf", "l2"]
VALUES = st.one_of(st.sampled_from(ODD), st.integers(-10**20, 10**20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(string.printable, max_size=12))
OPTIONS = ["beta", "eps_inv", "steps_inv", "step_size_inv", "kl_direction", "detach_inverse", "inverse_loss",
           "gamma", "host", "mu", "nonsense", "eps"]


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(trainer_mod.Trainer, "fit", lambda self: {"stub": True})


def _check(code, err):
    lines = [line for line in err.strip().splitlines() if not line.startswith("[iat.data]")]
    assert code in (0, 2), err
    assert "Traceback" not in err and len(lines) <= 2, err


@SETTINGS
@given(flag=st.sampled_from(TRAIN_FLAGS), value=VALUES)
def test_any_value_of_any_train_flag(flag, value, tmp_path_factory, capsys, no_training):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    try:
        code = main([*BASE, "--out", str(out), f"{flag}={value}"])
    except SystemExit as stop:  # argparse's own usage errors (a value it cannot take at all) exit 2
        code = stop.code
    _check(code, capsys.readouterr().err)


@SETTINGS
@given(option=st.sampled_from(OPTIONS), value=VALUES, method=st.sampled_from(["iat", "pgd-at", "trades+awp", "uiat-fgsm"]))
def test_any_method_option(option, value, method, tmp_path_factory, capsys, no_training):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code = main([*BASE, "--method", method, "--out", str(out), "-O", f"{option}={value}"])
    _check(code, capsys.readouterr().err)


@SETTINGS
@given(text=st.one_of(st.text(max_size=80), st.sampled_from([
    "[optim]\nepochs = 1e400\n", "[optim]\nmilestones = 5\n", "[threat]\neps = -1\n", "method = 3\n",
    "[data]\nval_size = 99999\n", "[optim]\nlr = 'x'\n", "[threat]\nbn_mode = 'eval'\n", "[[cells]]\n"])),
       suffix=st.sampled_from([".toml", ".json"]))
def test_any_config_file_text(text, suffix, tmp_path_factory, capsys, no_training):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / f"c{suffix}").write_text(text)
    code = main([*BASE, "--config", str(folder / f"c{suffix}"), "--out", str(folder / "run")])
    _check(code, capsys.readouterr().err)


@SETTINGS
@given(data=st.binary(max_size=200), name=st.sampled_from(["last.safetensors", "best.safetensors", "config.json"]))
def test_any_damaged_file_of_an_existing_run_leaves_it_unchanged(data, name, tmp_path_factory, capsys):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    (run / "checkpoints").mkdir(parents=True)
    target = run / ("checkpoints/" + name if name.endswith("safetensors") else name)
    target.write_bytes(data)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for argv in (["train", "--resume", str(run), "--no-progress"], ["eval", str(run), "--attacks", "natural",
                 "--checkpoint", "last" if name.startswith("last") else "best", "--no-progress"]):
        _check(main(argv), capsys.readouterr().err)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
