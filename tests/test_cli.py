"""The command line end to end on synthetic data: one epoch per method, eval, list, bad input."""
import json
import subprocess
import sys

import pytest

from iat.cli import main
from iat.methods import METHODS

FAST = ["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64",
        "--val-size", "128", "--steps", "2", "--eps", "8/255", "--step-size", "2/255", "--no-progress"]


@pytest.mark.parametrize("method", METHODS.names())
def test_one_epoch_per_method(tmp_path, method, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", method, *FAST, "--out", str(out)]) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["method"]["name"] == method
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and 0 <= json.loads(lines[0])["val_robust"] <= 1
    assert (out / "checkpoints" / "last.safetensors").exists()
    assert (out / "checkpoints" / "best.safetensors").exists()


def test_train_then_eval_writes_protocol(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "pgd-at", *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--attacks", "natural,fgsm,pgd20,cw", "--n-examples", "64",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pgd20" in printed and "worst case" in printed
    result = json.loads((out / "eval-best.json").read_text())
    rows = {r["attack"]: r for r in result["results"]}
    assert rows["pgd20"]["protocol"]["steps"] == 20
    assert rows["pgd20"]["protocol"]["eps"] == pytest.approx(8 / 255)
    assert result["data"]["n_examples"] == 64 and result["data"]["split"] == "test"
    assert rows["worst case"]["accuracy"] <= min(r["accuracy"] for r in result["results"])
    assert rows["pgd20"]["accuracy"] <= rows["natural"]["accuracy"]


def test_config_file_and_flags_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "iat"\n[optim]\nlr = 0.05\nepochs = 3\n[threat]\neps = "4/255"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), *FAST, "--out", str(out), "--beta", "2"]) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["optim"]["lr"] == 0.05
    assert resolved["config"]["optim"]["epochs"] == 1           # flag beats file
    assert resolved["config"]["threat"]["eps"] == pytest.approx(8 / 255)
    assert resolved["method"]["beta"] == 2.0


@pytest.mark.parametrize("what", ["models", "attacks", "methods", "datasets"])
def test_list(what, capsys):
    assert main(["list", what]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--model", "nope"], "unknown model"),
    (["--dataset", "nope"], "unknown data set"),
    (["--eps", "-1"], "eps"),
    (["--steps", "0"], "steps"),
    (["-O", "gamma=1"], "no option gamma"),
    (["--set", "optim.nonsense=1"], "unknown config key"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, message, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "pgd-at", *FAST, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "standard", *FAST, "--out", str(out)]) == 0
    before = (out / "checkpoints" / "last.safetensors").read_bytes()
    assert main(["train", "--method", "standard", *FAST, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == before


def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "iat", "list", "methods"], capture_output=True, text=True)
    assert done.returncode == 0 and "iat" in done.stdout


@pytest.mark.parametrize("command", ["train", "eval", "report", "reproduce"])
def test_every_flag_has_a_help_line_that_shows_its_default(command):
    """The flags are generated from the config dataclasses: each has a help line naming its default."""
    import argparse

    from iat.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 8
    for action in actions:
        if action.option_strings:
            assert action.help and "default" in action.help, action.option_strings


def test_names_come_from_the_registries_and_a_typo_suggests_the_nearest(tmp_path, capsys):
    from iat.methods import METHODS

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in METHODS.names())
    assert main(["train", "--method", "pgd_at", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'pgd-at'" in capsys.readouterr().err


def test_a_small_data_set_trains_with_the_default_validation_split(tmp_path, capsys):
    """iat 0.1: `--dataset synthetic` (512 training images) failed with "val_size must be ... in [0, 512)"."""
    out = tmp_path / "run"
    assert main(["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
                 "--steps", "1", "--val-steps", "1", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "config.json").read_text())
    n = record["data"]["train"] + record["data"]["val"]
    assert record["config"]["data"]["val_size"] is None and record["data"]["val"] == n // 10


def test_a_missing_data_set_names_the_command_that_fetches_it(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "iat data fetch mnist" in err and "download=True" not in err


def _threat_of(args, tmp_path):
    from iat.cli import build_parser
    from iat.cli.commands import train_config

    cfg, source = train_config(build_parser().parse_args(["train", *args, "--out", str(tmp_path / "r")]))
    return (cfg.threat.eps, cfg.threat.step_size, cfg.threat.steps, cfg.threat.norm), source


def test_without_eps_a_run_takes_its_data_sets_standard_threat_model(tmp_path):
    standard = ((0.3, 0.01, 40, "linf"), "the standard threat model of mnist")
    assert _threat_of(["--dataset", "mnist"], tmp_path) == standard
    assert _threat_of(["--dataset", "fashion-mnist"], tmp_path)[0] == (0.1, 0.025, 5, "linf")
    for name in ("cifar10", "cifar100", "svhn"):
        assert _threat_of(["--dataset", name], tmp_path)[0] == (8 / 255, 2 / 255, 10, "linf")
    assert _threat_of(["--dataset", "mnist", "--steps", "7"], tmp_path)[0] == (0.3, 0.01, 7, "linf")  # given wins
    # with eps given nothing else changes: the generic step size and steps, exactly as before
    assert _threat_of(["--dataset", "mnist", "--eps", "0.2"], tmp_path) == ((0.2, 2 / 255, 10, "linf"), "as given")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "mnist"\n[threat]\neps = 0.1\n')
    assert _threat_of(["--config", str(cfg)], tmp_path)[0] == (0.1, 2 / 255, 10, "linf")
    assert _threat_of(["--dataset", "mnist", "--set", "threat.eps=0.1"], tmp_path)[0][:2] == (0.1, 2 / 255)
    assert _threat_of(["--dataset", "synthetic"], tmp_path)[0] == (8 / 255, 2 / 255, 10, "linf")  # no standard


def test_another_norm_than_the_standard_needs_its_own_eps(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--norm", "l2", "--out", str(tmp_path / "r")]) == 2
    assert "standard threat model of mnist is linf; with --norm l2 give --eps too" in capsys.readouterr().err


def test_the_resolved_threat_model_is_recorded_printed_and_kept_on_resume(tmp_path, monkeypatch, capsys):
    from iat.data import STANDARDS
    from iat.data.standards import Standard
    from iat.threat import ThreatModel

    out = tmp_path / "X"
    with monkeypatch.context() as m:  # as if synthetic had a field standard
        m.setitem(STANDARDS, "synthetic", Standard(ThreatModel(eps=0.2, step_size=0.05, steps=1)))
        assert main(["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
                     "--val-steps", "1", "--out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["threat"] == {"eps": 0.2, "step_size": 0.05, "steps": 1, "norm": "linf",
                                 "from": "the standard threat model of synthetic"}
    recorded = json.loads((out / "config.json").read_text())["config"]["threat"]
    assert recorded == {"eps": 0.2, "step_size": 0.05, "steps": 1, "norm": "linf"}
    # the standard is gone again, but the run's config.json holds explicit values: resuming is the same run
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threat"]["eps"] == 0.2
    assert json.loads((out / "config.json").read_text())["config"]["threat"] == recorded
