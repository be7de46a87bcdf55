"""`iat eval --extend`: an evaluation grown to more examples attacks only the new ones and equals, example for
example, one evaluation of them all (deterministic attacks); anything but a smaller n is not extended."""
import json
import logging

import pytest

from iat.attacks.autoattack import AutoAttack
from iat.cli import main
from iat.evaluation import pipeline
from iat.evaluation.accuracy import unpack_flags
from iat.evaluation.extend import part_seed

FAST = ["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64", "--val-size", "64",
        "--steps", "1", "--eps", "8/255", "--step-size", "4/255", "--no-progress"]
EVAL = ["--checkpoint", "last", "--batch-size", "12", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("extend") / "run"
    assert main(["train", "--method", "pgd-at", *FAST, "--out", str(out)]) == 0
    return out


def _flags(path):
    record = json.loads(path.read_text())
    n = record["data"]["n_examples"]
    return record, {k: unpack_flags(v, n).tolist() for k, v in record["per_example"].items()}


def test_extend_attacks_only_the_new_examples_and_equals_one_evaluation_of_all(run, tmp_path, capsys, monkeypatch):
    grown, whole = tmp_path / "grown.json", tmp_path / "whole.json"
    attacks = ["--attacks", "fgsm,pgd20", "--eps", "0.2"]  # a large ball, so that the attacks break some examples
    assert main(["eval", str(run), *EVAL, *attacks, "--n-examples", "24", "--out", str(grown)]) == 0
    first, first_flags = _flags(grown)
    capsys.readouterr()
    attacked, original = [], pipeline.robust_accuracy
    monkeypatch.setattr(pipeline, "robust_accuracy", lambda model, x, *a, **k: (attacked.append(len(x)),
                                                                                original(model, x, *a, **k))[1])
    assert main(["eval", str(run), *EVAL, *attacks, "--n-examples", "60", "--out", str(grown), "--extend"]) == 0
    assert attacked == [36]
    assert "first 24 examples; attacking examples 24..59 only" in capsys.readouterr().out
    assert main(["eval", str(run), *EVAL, *attacks, "--n-examples", "60", "--out", str(whole)]) == 0
    record, flags = _flags(grown)
    _, full = _flags(whole)
    assert record["data"]["n_examples"] == 60
    assert 0 < sum(full["fgsm"]) < sum(full["natural"])
    for name in ("natural", "fgsm"):  # no random start: the same outcome per example as one evaluation of all 60
        assert flags[name] == full[name]
    assert flags["pgd20"][:24] == first_flags["pgd20"]  # the first part is kept, not attacked again
    rows = {r["attack"]: r for r in record["results"]}
    assert rows["pgd20"]["correct"] == sum(flags["pgd20"]) and rows["worst case"]["correct"] == sum(
        a and b and c for a, b, c in zip(flags["natural"], flags["fgsm"], flags["pgd20"]))
    assert rows["fgsm"]["attacked"] == sum(flags["natural"]) and all(r["total"] == 60 for r in rows.values())
    assert [p["examples"] for p in record["parts"]] == [[0, 24], [24, 60]]
    assert [p["generator_seed"] for p in record["parts"]] == [0, part_seed(0, 24)] and part_seed(0, 24) != 0
    assert record["seconds"] >= first["seconds"] + record["parts"][1]["seconds"]  # plus the checks on all 60
    assert {c["name"] for c in record["sanity"]} == {c["name"] for c in first["sanity"]}  # re-run on all 60
    assert (tmp_path / "grown.csv").exists() and (tmp_path / "grown.md").exists()


@pytest.mark.parametrize("change, says", [
    (["--attacks", "fgsm,pgd20", "--n-examples", "30"], "already holds another evaluation: attacks"),
    (["--attacks", "fgsm", "--n-examples", "8"], "already holds another evaluation"),  # fewer examples
    (["--attacks", "fgsm", "--eps", "4/255", "--n-examples", "30"], "threat model"),
])
def test_anything_but_more_of_the_same_evaluation_follows_the_replace_rule(run, tmp_path, capsys, change, says):
    out = tmp_path / "e.json"
    assert main(["eval", str(run), *EVAL, "--attacks", "fgsm", "--n-examples", "12", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["eval", str(run), *EVAL, *change, "--out", str(out), "--extend"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and out.read_bytes() == before


def test_another_seed_is_not_extended(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(run), *EVAL, "--attacks", "fgsm", "--n-examples", "12", "--out", str(out)]) == 0
    assert main(["eval", str(run), *EVAL, "--attacks", "fgsm", "--n-examples", "24", "--seed", "1", "--out",
                 str(out), "--extend", "--overwrite"]) == 0  # replaced as a whole: the first part had seed 0
    record = json.loads(out.read_text())
    assert record["parts"] == [] and record["seed"] == 1 and record["data"]["n_examples"] == 24


def test_a_results_file_with_damaged_outcomes_is_not_extended(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(run), *EVAL, "--attacks", "fgsm", "--n-examples", "12", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    record["per_example"]["fgsm"] = "00"  # 8 examples' bits, not 12
    out.write_text(json.dumps(record))
    before = out.read_bytes()
    assert main(["eval", str(run), *EVAL, "--attacks", "fgsm", "--n-examples", "24", "--out", str(out),
                 "--extend"]) == 2
    err = capsys.readouterr().err.strip()
    assert "12 examples (this one: 24)" in err and len(err.splitlines()) == 1 and out.read_bytes() == before


def test_autoattack_diagnostics_continue_from_the_first_part():
    first = {"flags": ["a warning"], "broken_by": {"apgd-ce": 3, "square": 1}, "seeds": [7]}
    aa = AutoAttack(eps=0.1)
    aa.restore(first)
    aa._record([logging.LogRecord("auto-attack", logging.INFO, "", 0,
                                  "apgd-ce - 1/1 - 2 out of 10 successfully perturbed", None, None)])
    aa.seeds.append(9)
    assert aa.diagnostics() == {"flags": ["a warning"], "broken_by": {"apgd-ce": 5, "square": 1}, "seeds": [7, 9]}
    assert first == {"flags": ["a warning"], "broken_by": {"apgd-ce": 3, "square": 1}, "seeds": [7]}  # not aliased
