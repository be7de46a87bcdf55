"""Every numeric setting is range-checked, on flags, config files and method options alike: a value out of
range is one line, exit status 2, before any work (iat 0.1 accepted --beta -1, --set optim.gamma=-1, ...)."""
import pytest

from iat.cli import main
from iat.errors import UsageError
from iat.methods import create_method
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
