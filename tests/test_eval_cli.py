"""`iat eval` and `iat report` end to end on tiny runs trained on synthetic data."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from iat.cli import main

FAST = ["--dataset", "synthetic", "--model", "cnn", "--epochs", "2", "--batch-size", "64", "--val-size", "128",
        "--steps", "2", "--eps", "8/255", "--step-size", "2/255", "--no-progress"]



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of two epochs each: pgd-at and standard."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("pgd-at", "standard"):
        out[method] = root / method
        assert main(["train", "--method", method, *FAST, "--out", str(out[method])]) == 0
    return out


def _valid_png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG" and im.size[0] > 100


def test_eval_writes_json_csv_markdown_checks_and_sweep(runs, capsys):
    run = runs["pgd-at"]
    assert main(["eval", str(run), "--attacks", "fgsm,pgd20,pgd20:restarts=2", "--n-examples", "32",
                 "--batch-size", "12", "--eps-sweep", "0,4/255,8/255,0.25,0.5,1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "worst case" in printed and "PASS" in printed and "2 restarts" in printed
    result = json.loads((run / "eval-best.json").read_text())
    rows = {r["attack"]: r for r in result["results"]}
    assert list(rows) == ["natural", "fgsm", "pgd20", "pgd20:restarts=2", "worst case"]  # natural always first
    assert rows["pgd20:restarts=2"]["protocol"]["restarts"] == 2
    assert all(r["total"] == 32 for r in rows.values()) and result["seed"] == 0 and result["mode"] == "each"
    assert rows["worst case"]["correct"] <= min(r["correct"] for r in rows.values())
    checks = {c["name"]: c for c in result["sanity"]}
    assert {"robust_le_natural", "more_effort_not_better", "zero_gradients", "randomised_outputs",
            "eps_sweep_decreasing", "eps_sweep_reaches_zero", "class_coverage"} <= set(checks)
    assert checks["class_coverage"]["status"] in ("pass", "skip")  # synthetic test split: classes mixed
    assert all(c["status"] in ("pass", "warn", "skip") and c["message"] for c in checks.values())
    # the sweep of a trained model falls with eps and reaches 0 at the full range
    points = result["eps_sweep"]["points"]
    counts = [p["correct"] for p in points]
    assert [p["eps"] for p in points] == sorted(p["eps"] for p in points)
    assert all(b <= a + 1 for a, b in zip(counts, counts[1:])) and counts[0] == rows["natural"]["correct"]
    assert counts[-1] == 0 and checks["eps_sweep_decreasing"]["status"] == "pass"
    assert _valid_png(run / "eval-best-eps-sweep.png")
    table = list(csv.DictReader((run / "eval-best.csv").open()))
    assert [r["attack"] for r in table] == list(rows) and "20 steps of 2/255" in table[2]["protocol"]
    md = (run / "eval-best.md").read_text()
    assert "| pgd20 |" in md and "20 steps of 2/255" in md and "## Sanity checks" in md


def test_eval_worst_case_only_is_cumulative(runs, tmp_path, capsys):
    out = tmp_path / "wc.json"
    assert main(["eval", str(runs["standard"]), "--attacks", "natural,fgsm,pgd20", "--eps", "32/255",
                 "--n-examples", "32", "--worst-case-only", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    rows = {r["attack"]: r for r in result["results"]}
    assert result["mode"] == "cumulative" and rows["pgd20"]["counted"] == "cumulative"
    assert rows["fgsm"]["counted"] == "own"  # the first attack still ran on every naturally correct example
    assert rows["pgd20"]["correct"] <= rows["fgsm"]["correct"] <= rows["natural"]["correct"]
    assert rows["pgd20"]["attacked"] == rows["fgsm"]["correct"]  # pgd20 ran only on fgsm's survivors
    assert rows["worst case"]["correct"] == rows["pgd20"]["correct"]
    assert out.with_suffix(".csv").exists() and out.with_suffix(".md").exists()


@pytest.mark.parametrize("args, message", [
    (["--attacks", "pgd20:bogus=1"], "does not accept"),
    (["--attacks", "pgd20:restarts"], "KEY=VALUE"),
    (["--attacks", "nope"], "unknown attack"),
    (["--out", "x.txt"], ".json"),
    (["--eps-sweep", "8/255"], "at least two"),
])
def test_eval_bad_input_one_line(runs, args, message, capsys):
    assert main(["eval", str(runs["standard"]), "--n-examples", "8", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_autoattack_missing_is_one_line(runs, monkeypatch, capsys):
    from iat.attacks import autoattack as adapter

    monkeypatch.setattr(adapter.importlib.util, "find_spec", lambda name: None)
    assert main(["eval", str(runs["standard"]), "--attacks", "natural,autoattack", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "iat[autoattack]"' in err and len(err.splitlines()) == 1


def test_report_two_runs_side_by_side_with_curves(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    from iat.reporting import report

    legends, draw = [], report.plot_training_curves
    monkeypatch.setattr(report, "plot_training_curves", lambda curves, *a, **k: legends.append(list(curves))
                        or draw(curves, *a, **k))
    assert main(["report", str(runs["pgd-at"]), str(runs["standard"]), "--out", str(out), "--eval-missing",
                 "--attacks", "natural,fgsm", "--n-examples", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pgd-at" in printed and "standard" in printed
    for run in runs.values():  # the missing evals were run and saved in each run
        assert (run / "eval-last.json").exists()
    table = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["run"], r["checkpoint"]) for r in table] == [("pgd-at", "best"), ("pgd-at", "last"),
                                                            ("standard", "best"), ("standard", "last")]
    assert all(r["natural"] and r["fgsm"] and r["worst case"] for r in table)
    assert all(float(r["worst case"]) <= float(r["fgsm"]) for r in table)
    md = (out / "report.md").read_text()
    assert "| run | method | checkpoint |" in md and "Protocols:" in md and "curves.png" in md
    assert _valid_png(out / "curves.png")
    seed0 = tmp_path / "seed0"  # a folder named like most runs of a table: the legend names the method
    shutil.copytree(runs["standard"], seed0)
    assert main(["report", str(runs["pgd-at"]), str(seed0), "--out", str(tmp_path / "r2"), "--no-progress"]) == 0
    assert legends[-1] == ["pgd-at", "standard (seed0)"]
    summary = json.loads((out / "report.json").read_text())
    assert summary["columns"][0] == "natural" and summary["columns"][-1] == "worst case"


def test_report_merges_evals_with_exact_worst_case(runs, tmp_path, capsys):
    run = runs["standard"]
    for attacks, name in (("natural,fgsm", "eval-best.json"), ("pgd20", "eval-best-pgd.json")):
        assert main(["eval", str(run), "--attacks", attacks, "--eps", "16/255", "--n-examples", "24",
                     "--out", str(run / name), "--no-progress", "--overwrite"]) == 0  # the fixture's earlier eval
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--checkpoints", "best", "--no-plots"]) == 0
    row = json.loads((tmp_path / "rep" / "report.json").read_text())["rows"][0]
    evals = [json.loads((run / n).read_text()) for n in ("eval-best.json", "eval-best-pgd.json")]
    from iat.evaluation.accuracy import unpack_flags

    worst = unpack_flags(evals[0]["per_example"]["worst_case"], 24) & unpack_flags(
        evals[1]["per_example"]["worst_case"], 24)
    assert set(row["acc"]) == {"natural", "fgsm", "pgd20", "worst case"}
    assert row["acc"]["worst case"] == pytest.approx(int(worst.sum()) / 24) and row["worst_exact"]


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an iat run directory" in err and len(err.splitlines()) == 1


def test_report_leaves_out_cumulative_columns():
    from iat.evaluation.accuracy import pack_flags
    from iat.records import EvalRecord
    from iat.reporting.report import merge_evals

    def result(mode, rows, worst):
        n = len(worst)
        return (f"eval-best-{mode}.json", EvalRecord(
            checkpoint="x", checkpoint_epoch=3, threat={"eps": 0.1, "norm": "linf"},
            data={"name": "synthetic", "n_examples": n},
            results=[{"attack": a, "correct": c, "accuracy": c / n, "counted": k, "protocol": {}}
                     for a, c, k in rows] + [{"attack": "worst case", "correct": sum(worst)}],
            per_example={"worst_case": pack_flags(torch.tensor(worst))}))

    each = result("each", [("natural", 4, "natural"), ("cw", 3, "own")], [1, 1, 1, 0])
    cum = result("cum", [("natural", 4, "natural"), ("pgd20", 3, "own"), ("cw", 1, "cumulative")], [0, 1, 0, 0])
    merged = merge_evals([each, cum])
    assert merged["rows"]["cw"]["correct"] == 3 and merged["rows"]["pgd20"]["correct"] == 3
    assert merged["worst_case"] == 0.25 and merged["worst_exact"]


def test_a_plain_state_dict_is_evaluated_in_its_data_sets_standard_threat_model(tmp_path, capsys, monkeypatch):
    """iat 0.1: `iat eval model.pt --model M --dataset D` (the README's form) failed "records no threat model".
    Now it uses D's standard l-inf radius (MNIST 0.3, Fashion-MNIST 0.1, CIFAR and SVHN 8/255) and says so;
    a data set without one still asks for --eps."""
    import torch

    from iat.data import STANDARDS, standard_eps
    from iat.data.standards import Standard
    from iat.models import create_model
    from iat.threat import ThreatModel

    assert (standard_eps("mnist"), standard_eps("fashion-mnist"), standard_eps("cifar10")) == (0.3, 0.1, 8 / 255)
    net = create_model("cnn", num_classes=4, in_channels=1, input_size=16, mean=[0.5], std=[0.25])
    torch.save(net.state_dict(), tmp_path / "net.pt")
    args = ["eval", str(tmp_path / "net.pt"), "--model", "cnn", "--dataset", "synthetic", "--attacks", "natural,fgsm",
            "--n-examples", "16", "--no-progress"]
    assert main(args) == 2
    assert "no standard threat model; give --eps" in capsys.readouterr().err
    # as if synthetic had a field standard
    monkeypatch.setitem(STANDARDS, "synthetic", Standard(ThreatModel(eps=0.25, step_size=0.05, steps=3)))
    assert main(args) == 0
    assert "threat model linf eps 0.25 (the standard threat model of synthetic)" in capsys.readouterr().out
    result = json.loads((tmp_path / "net.eval.json").read_text())
    assert result["threat"]["eps"] == 0.25 and "standard" in result["method"]["threat_model"]
    assert main([*args, "--norm", "l2"]) == 2  # the standard is l-inf: another norm needs its own eps
    assert "with --norm l2 give --eps too" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_the_data_is_refused_before_any_attack(runs, tmp_path):
    """iat 0.1 evaluated a 4-class run on 10-class data with exit 0 (and a traceback for another image size)."""
    from iat.data import load_dataset
    from iat.errors import UsageError
    from iat.evaluation.pipeline import check_fits
    from iat.records import read_run

    spec = read_run(runs["pgd-at"] / "config.json").model
    check_fits(Path("ckpt"), spec, load_dataset("synthetic"))
    with pytest.raises(UsageError, match="trained for 4 classes but synthetic has 10"):
        check_fits(Path("ckpt"), spec, load_dataset("synthetic", num_classes=10))
    with pytest.raises(UsageError, match="trained for 32x32 images"):
        check_fits(Path("ckpt"), {**spec, "input_size": 32}, load_dataset("synthetic"))


def test_a_checkpoint_is_refused_on_images_of_another_width(runs):
    """The fit check compared only the height: a 16x16 model passed on 16x24 images and failed deep in torch."""
    import dataclasses

    import torch

    from iat.data import load_dataset
    from iat.data.core import Split
    from iat.errors import UsageError
    from iat.evaluation.loading import model_spec_for
    from iat.evaluation.pipeline import check_fits
    from iat.records import read_run

    spec = read_run(runs["pgd-at"] / "config.json").model
    square = load_dataset("synthetic")
    n, c, h, w = square.test.x.shape
    wide = torch.zeros(n, c, h, w + 8, dtype=torch.uint8)
    bundle = dataclasses.replace(square, test=Split(wide, square.test.y), train=Split(wide, square.test.y))
    with pytest.raises(UsageError, match=f"trained for {h}x{h} images but synthetic has {h}x{w + 8}"):
        check_fits(Path("ckpt"), spec, bundle)
    with pytest.raises(UsageError, match=f"synthetic has {h}x{w + 8} images but models take square ones"):
        model_spec_for("cnn", bundle)


def test_a_checkpoint_with_non_finite_weights_is_not_evaluated(runs, tmp_path, capsys):
    """iat 0.1 evaluated NaN weights with exit 0, and its zero-gradient check said PASS."""
    import shutil

    from iat.runtime.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs["pgd-at"], run)
    state = load_checkpoint(run / "checkpoints" / "best.safetensors")
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)
    state["model"][key] = state["model"][key] * float("nan")
    save_checkpoint(run / "checkpoints" / "best.safetensors", state)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "natural", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite weights" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written


def test_an_unwritable_output_is_found_before_the_evaluation(runs, tmp_path, capsys, monkeypatch):
    from iat.evaluation import pipeline

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr(pipeline, "robust_accuracy", lambda *a, **k: pytest.fail("evaluated first"))
    assert main(["eval", str(runs["pgd-at"]), "--attacks", "natural", "--no-progress",
                 "--out", str(tmp_path / "a-file" / "eval.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_checkpoint_of_another_architecture_names_the_mismatch(runs, tmp_path, capsys):
    import shutil

    from iat.runtime.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs["pgd-at"], run)
    path = run / "checkpoints" / "best.safetensors"
    state = load_checkpoint(path)
    key = next(k for k, v in state["model"].items() if v.dim() > 1)
    state["model"][key] = torch.zeros(3, *state["model"][key].shape[1:])
    save_checkpoint(path, state)
    assert main(["eval", str(run), "--attacks", "natural", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "size mismatch" in err and key in err


# ------------------------------------------------------------------ user models: --model package.module:factory
USER_MODELS = """
from torch import nn


def make(num_classes, in_channels, input_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))


def broken(num_classes, in_channels, input_size):
    raise RuntimeError("no such layer")
"""


def _iat(args, pythonpath=None):
    """`iat ARGS` in a new process (as `iat eval RUN` runs after training), with PYTHONPATH extended."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, pythonpath) if p), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "iat", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    sys.modules.pop("mymod", None)


def test_a_users_model_trains_and_a_new_process_evaluates_it(user_models, capsys):
    run = user_models / "run"
    fast = [a if a != "cnn" else "mymod:make" for a in FAST]
    assert main(["train", "--method", "pgd-at", *fast, "--epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"] == "mymod:make" and config["model"]["name"] == "mymod:make"
    args = ["eval", str(run), "--attacks", "natural,fgsm", "--n-examples", "32", "--no-progress"]
    done = _iat(args, pythonpath=str(user_models))
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "eval-best.json").read_text())["model"]["name"] == "mymod:make"
    lost = _iat(args)  # without the module on the path: one line saying what to do, exit 2
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1
    assert "cannot import 'mymod'" in lost.stderr and "PYTHONPATH" in lost.stderr


@pytest.mark.parametrize("model,message", [
    ("mymod:missing", "mymod has no attribute 'missing'"),
    ("mymod:broken", "the factory raised RuntimeError: no such layer"),
    ("nosuchpackage.mod:make", "cannot import 'nosuchpackage'"),
])
def test_a_bad_model_path_exits_2_with_one_line(user_models, capsys, model, message):
    fast = [a if a != "cnn" else model for a in FAST]
    assert main(["train", "--method", "standard", *fast, "--out", str(user_models / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and f"--model {model}" in err and err.count("\n") == 1
    assert not (user_models / "bad").exists()


def test_a_model_registered_from_python_is_evaluable_only_by_import_path(tmp_path, monkeypatch, capsys):
    """Registration lives in the training process; `iat eval RUN` (a new process) says to use module:factory."""
    from torch import nn

    from iat.models import MODELS

    def tiny(num_classes, in_channels, input_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))

    monkeypatch.setitem(MODELS._items, "my-tiny", tiny)
    monkeypatch.setitem(MODELS._help, "my-tiny", "")
    run = tmp_path / "run"
    fast = [a if a != "cnn" else "my-tiny" for a in FAST]
    assert main(["train", "--method", "standard", *fast, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--attacks", "natural", "--n-examples", "16", "--no-progress"]) == 0  # same process
    done = _iat(["eval", str(run), "--attacks", "natural", "--n-examples", "16", "--no-progress"])
    assert done.returncode == 2 and "unknown model 'my-tiny'" in done.stderr
    assert "package.module:factory" in done.stderr and done.stderr.count("\n") == 1


def test_report_fills_last_when_it_is_the_best_epoch_and_names_left_out_columns(tmp_path, capsys):
    run = tmp_path / "one-epoch"
    assert main(["train", "--method", "pgd-at", *FAST, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--attacks", "natural,fgsm,pgd20", "--worst-case-only", "--n-examples", "16",
                 "--no-progress"]) == 0
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "--no-plots"]) == 0
    rows = {r["checkpoint"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert rows["last"]["worst case"] and rows["last"]["worst case"] == rows["best"]["worst case"]
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("the last checkpoint is the best one (epoch 1" in n for n in notes)
    assert any("columns pgd20 left out: a --worst-case-only eval" in n for n in notes)
