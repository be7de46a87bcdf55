"""`iat report` over runs trained on different data sets: a data-set column and one warning on stderr."""
import csv
import json
import shutil

import pytest

from cli_helpers import train_tiny
from iat.cli import main


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "four")


def _copy(run, dest, **edit):
    """A copy of `run` whose run record claims another data set (name, num_classes)."""
    shutil.copytree(run, dest)
    record = json.loads((dest / "config.json").read_text())
    if "name" in edit:
        record["data"]["name"] = edit["name"]
        record["config"]["data"]["name"] = edit["name"]
    if "num_classes" in edit:
        record["model"]["num_classes"] = edit["num_classes"]
    (dest / "config.json").write_text(json.dumps(record))
    return dest


@pytest.mark.parametrize("edit, expected", [
    ({"num_classes": 6}, ["synthetic (4 classes)", "synthetic (6 classes)"]),
    ({"name": "fashion-mnist"}, ["synthetic (4 classes)", "fashion-mnist (4 classes)"]),
])
def test_report_flags_runs_on_different_data_sets(base_run, tmp_path, capsys, edit, expected):
    other = _copy(base_run, tmp_path / "other", **edit)
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", str(base_run), str(other), "--out", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "different data sets" in line]
    assert warnings == [f"iat report: warning: these runs were trained on different data sets "
                        f"({', '.join(expected)}); their accuracies are not comparable"]
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {r["run"]: r["data set"] for r in rows} == {"four": expected[0], "other": expected[1]}
    md = (out / "report.md").read_text()
    assert "| data set |" in md and expected[1] in md
    summary = json.loads((out / "report.json").read_text())
    assert summary["datasets"] == expected and all("dataset" in r for r in summary["rows"])


def test_report_on_one_data_set_has_no_column_or_warning(base_run, tmp_path, capsys):
    other = _copy(base_run, tmp_path / "same")
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", str(base_run), str(other), "--out", str(out), "--no-plots"]) == 0
    assert "different data sets" not in capsys.readouterr().err
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert "data set" not in rows[0] and list(rows[0])[:6] == ["run", "method", "checkpoint", "epoch", "n", "threat"]
    assert "data set" not in (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert "datasets" not in summary and not any("dataset" in r for r in summary["rows"])
