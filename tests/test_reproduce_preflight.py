"""`iat reproduce` checks what its cells need before the first one starts: a missing data set or a missing
AutoAttack package is one line and exit 2, with nothing started (it used to launch every cell, each failing
alone after seconds with the same line)."""
import importlib.util

import pytest

from iat.cli import main

SPEC = """
title = "needs {data}"
seeds = [0]
[config]
method = "standard"
model = "cnn"
[config.data]
name = "{data}"
root = "{root}"
val_size = 64
[config.optim]
epochs = 1
batch_size = 64
[config.val]
n_examples = 16
[[cells]]
name = "a"
[[cells]]
name = "b"
[[evals]]
attacks = "{attacks}"
n_examples = 16
"""


def _spec(tmp_path, data="synthetic", attacks="natural"):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(data=data, root=tmp_path / "no-data", attacks=attacks))
    return path


def test_a_missing_data_set_stops_the_table_once_before_any_cell(tmp_path, capsys):
    out = tmp_path / "table"
    assert main(["reproduce", str(_spec(tmp_path, data="fashion-mnist")), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("iat: error: 2 of the cells with work (e.g. a/seed0) train on fashion-mnist")
    assert "iat data fetch fashion-mnist" in err[-1] and err[-1].endswith("nothing was started")
    assert sum("error" in line for line in err) == 1
    assert not (out / "logs").exists() and not (out / "a").exists()


def test_a_missing_autoattack_package_stops_the_table_before_any_cell(tmp_path, capsys, monkeypatch):
    from iat.attacks.autoattack import PACKAGE

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE else real(name, *a))
    out = tmp_path / "table"
    code = main(["reproduce", str(_spec(tmp_path, attacks="natural,autoattack")), "--out", str(out), "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the table's evaluations run AutoAttack" in err[-1] and "iat[autoattack]" in err[-1]
    assert not (out / "logs").exists()


def test_a_table_with_nothing_left_to_do_needs_no_data(tmp_path, capsys, monkeypatch):
    """A finished table is rebuilt where its data set is gone: with no cell to run, nothing is loaded."""
    import iat.reproduce.runner as runner
    from iat.errors import UsageError

    out = tmp_path / "table"
    spec = _spec(tmp_path)
    assert main(["reproduce", str(spec), "--out", str(out), "--no-plots", "--jobs", "2"]) == 0

    def gone(name, *a, **k):
        raise UsageError(f"{name} not found")

    monkeypatch.setattr(runner, "load_dataset", gone)
    capsys.readouterr()
    assert main(["reproduce", str(spec), "--out", str(out), "--no-plots"]) == 0
    assert "0 of 2 cells have work" in capsys.readouterr().err
    (out / "b" / "seed0" / "eval-best.json").unlink()  # one evaluation to redo: now the data must load
    assert main(["reproduce", str(spec), "--out", str(out), "--no-plots"]) == 2
    assert "1 of the cells with work (e.g. b/seed0) train on synthetic, which does not load" in capsys.readouterr().err
