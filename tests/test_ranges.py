"""Every numeric setting is range-checked, on flags, config files and method options alike: a value out of
range is one line, exit status 2, before any work (iat 0.1 accepted --beta -1, --set optim.gamma=-1, ...)."""
import dataclasses
import doctest
import importlib

import pytest

from iat.attacks import PGD
from iat.cli import main
from iat.errors import UsageError
from iat.methods import METHODS, create_method
from iat.methods.awp import AWP, AWPOptions
from iat.methods.base import method_class
from iat.methods.trades import TRADES
from iat.methods.uiat import UIATFGSM
from iat.threat import ThreatModel
from iat.values import check_range

FAST = ["--method", "iat", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--steps", "1",
        "--val-steps", "1", "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--beta=-1"], "method option beta must be in [0, inf)"),
    (["--set", "optim.gamma=-1"], "optim.gamma must be in (0, inf)"),
    (["--set", "optim.momentum=1e400"], "must be a finite number"),
    (["--set", "optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
    (["--epochs", "1e400"], "must be a finite number"),
    (["--seed", "1e30"], "seed must be in [0, 2**63)"),
    (["--eps", "1e400"], "must be a finite number"),
    (["--eps=-0"], "eps is 0"),
    (["--checkpoint-every=-1"], "checkpoint_every_steps must be in [0, 1e12]"),
    (["--set", "optim.milestones=0.5,2"], "every value of optim.milestones must be in [0, 1], got 2.0"),
    (["-O", "eps_inv=-0.1"], "method option eps_inv must be in [0, 1]"),
    (["-O", "steps_inv=0"], "method option steps_inv must be in [1, 1e6]"),
])
def test_out_of_range_values_are_one_line_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_toml_values_are_checked_like_flags(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[optim]\nepochs = 1e400\n")
    assert main(["train", *FAST, "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "finite" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("[optim]\nmilestones = 5\n")
    assert main(["train", *FAST, "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "list of numbers" in capsys.readouterr().err


def test_check_range_bounds():
    check_range(0.0, "[0, 1)")
    check_range(1e9, "(0, inf)")
    for value, bounds in [(1.0, "[0, 1)"), (0.0, "(0, inf)"), (2**63, "[0, 2**63)"), (-1, "[0, 1]")]:
        with pytest.raises(UsageError):
            check_range(value, bounds)
    with pytest.raises(UsageError, match="gamma"):
        create_method("pgd-at+awp", gamma=-1)
    with pytest.raises(UsageError, match="mu"):
        create_method("uiat-fgsm", mu=1.0)


def option_fields(cls) -> list:
    """The dataclass fields that declare a method's options (X+awp: X's and AWPOptions')."""
    if issubclass(cls, AWP):
        return [*option_fields(cls.inner_class), *dataclasses.fields(AWPOptions)]
    return [f for f in dataclasses.fields(cls) if f.name in cls.option_types()]


def option_bounds() -> dict[str, set]:
    """Option name -> the ranges its declarations give, over every registered method."""
    seen: dict[str, set] = {}
    for name in METHODS.names():
        for f in option_fields(method_class(name)):
            seen.setdefault(f.name, set()).add(f.metadata.get("bounds"))
    return seen


def test_each_numeric_option_declares_one_range_beside_itself():
    """Bounds live on the option's field (setting(..., bounds=...)), as on the run config's: one range per name
    wherever it is declared, so a subclass that redeclares a default cannot drop or change its range."""
    seen = option_bounds()
    numeric = {"beta", "align_lambda", "eps_inv", "step_size_inv", "steps_inv", "init_radius", "gamma", "awp_lr",
               "awp_warmup", "mu", "step_scale", "init_scale", "num_classes"}
    assert numeric <= set(seen)
    for name in numeric:
        assert len(seen[name]) == 1 and None not in seen[name], (name, seen[name])


@pytest.mark.parametrize("build, message", [
    (lambda: TRADES(init_radius=-1.0), "method option init_radius must be in [0, 1], got -1.0"),
    (lambda: UIATFGSM(mu=1.0), "method option mu must be in [0, 1), got 1.0"),
    (lambda: AWPOptions(gamma=-1.0), "method option gamma must be in [0, inf), got -1.0"),
])
def test_a_method_built_directly_checks_its_ranges_too(build, message):
    with pytest.raises(UsageError) as err:
        build()
    assert str(err.value) == message


@pytest.mark.parametrize("kw, message", [(dict(steps=0), "attack steps must be at least 1, got 0"),
                                         (dict(step_size=0.0), "attack step size must be positive, got 0.0"),
                                         (dict(eps=1.5), "eps must be in [0, 1] for images in [0, 1], got 1.5")])
def test_an_attack_and_a_threat_model_refuse_the_same_values_alike(kw, message):
    """PGD checks eps, step size and steps by building its ThreatModel: one place, one message."""
    for build in (PGD, ThreatModel):
        with pytest.raises(UsageError) as err:
            build(**kw)
        assert str(err.value) == message


@pytest.mark.parametrize("module", ["iat.values", "iat.threat", "iat.attacks.engine", "iat.methods.base"])
def test_the_public_api_examples_run(module):
    """The >>> examples in the docstrings of create_method, Method.train_step, PGD and ThreatModel are correct."""
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
