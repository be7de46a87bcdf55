"""`iat reproduce`: every cell is an ordinary run directory; finished work is skipped, interrupted training
is resumed, the table is computed from the runs' own files, and a spec that disagrees with a run stops."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iat.cli import main
from iat.reproduce import render_table, runner, table
from iat.reproduce import spec as specs
from iat.training.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")

SPEC = """
title = "tiny table"
seeds = [0, 1]

[config]
method = "pgd-at"
model = "cnn"
device = "cpu"
[config.data]
name = "synthetic"
val_size = 64
[config.optim]
epochs = 2
batch_size = 64
lr = 0.05
[config.threat]
eps = "8/255"
step_size = "4/255"
steps = 1
[config.val]
steps = 1
n_examples = 32

[[cells]]
name = "pgd-at"
method = "pgd-at"

[[cells]]
name = "iat"
method = "iat"
method_options = { steps_inv = 1 }

[[evals]]
attacks = "natural,pgd20"
n_examples = 48

[[evals]]
name = "late"
attacks = "natural,cw"
n_examples = 32
late = true

[[compare]]
claim = "C1"
base = "pgd-at"
ours = "iat"

[[sweeps]]
option = "method_options.steps_inv"
cells = ["iat"]
columns = ["natural", "cw"]
reference = "pgd-at"
"""


@pytest.fixture
def spec_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", SRC)  # the runner's `iat` subprocesses import this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return path


def interrupt_after_first_epoch(spec: specs.TableSpec, out: Path, cell: str, seed: int, monkeypatch) -> Path:
    """Train a cell in-process and stop it like Ctrl-C right after its first epoch's checkpoint."""
    cfg = spec.train_config(spec.cell(cell), seed)
    run = runner.run_dir(out, spec.cell(cell), seed)
    original = Trainer.end_epoch

    def end_then_stop(self, epoch, *args):
        original(self, epoch, *args)
        self.save()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "end_epoch", end_then_stop)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg, run).fit()
    assert runner.train_state(run, cfg) == "partial"
    return run


def test_runner_trains_resumes_evaluates_skips_and_writes_the_table(spec_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "table"
    spec = specs.load_spec(str(spec_file))
    partial = interrupt_after_first_epoch(spec, out, "iat", 1, monkeypatch)

    assert main(["reproduce", str(spec_file), "--out", str(out), "--jobs", "2", "--threads", "1"]) == 0
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert "--resume" in logs["iat-seed1-train.log"] and "--config" in logs["iat-seed0-train.log"]
    assert [json.loads(line)["epoch"] for line in (partial / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    table = json.loads((out / "table.json").read_text())
    assert table["complete"] and table["columns"] == ["natural", "pgd20", "cw", "worst case"]
    for row in table["rows"]:  # every number is the mean of the runs' own eval files
        run = out / row["cell"]
        for column, first in (("pgd20", ""), ("cw", "-late")):
            per_seed = []
            for seed in (0, 1):
                result = json.loads((run / f"seed{seed}" / f"eval-{row['checkpoint']}{first}.json").read_text())
                per_seed.append(next(r["accuracy"] for r in result["results"] if r["attack"] == column))
                assert result["data"]["n_examples"] == (48 if not first else 32)
            assert row["acc"][column][0] == pytest.approx(100 * sum(per_seed) / 2)
    for seed in (0, 1):  # one file of weights is evaluated once and recorded for both checkpoints
        run = out / "pgd-at" / f"seed{seed}"
        records = runner.read_records(run)
        best = json.loads((run / "eval-best.json").read_text())
        assert (best.get("same_weights_as") is not None) == (records[-1].best_epoch == records[-1].epoch)
    claim = table["claims"][0]
    assert claim["claim"] == "C1" and claim["verdict"].split(":")[0] in ("holds", "mixed", "does not hold")
    md = (out / "table.md").read_text()
    assert "| iat | best" in md and "Regenerate: `iat reproduce" in md and (out / "curves.png").stat().st_size > 0
    sweep = table["sweeps"][0]["by_checkpoint"]["last"]["cw"]  # the sweep plot's points are the table's numbers
    row = next(r for r in table["rows"] if r["cell"] == "iat" and r["checkpoint"] == "last")
    assert sweep["line"] == [{"cell": "iat", "x": 1.0, "seeds": {str(s): pytest.approx(100 * v)
                                                               for s, v in row["per_seed"]["cw"].items()}}]
    assert len(sweep["reference"]) == 2 and "![accuracy against steps_inv](sweep-steps_inv.png)" in md
    assert (out / "sweep-steps_inv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("eval-*.json")}
    capsys.readouterr()
    assert main(["reproduce", str(spec_file), "--out", str(out)]) == 0  # nothing left to do
    err = capsys.readouterr().err
    assert err.count("0 of 4 cells have work") == 2
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("eval-*.json")}

    check_more_examples_extend_the_evals(spec_file, out, capsys)


def check_more_examples_extend_the_evals(spec_file, out, capsys):
    """A finished table whose late group asks for more examples: the runner attacks only the new ones; asked
    for fewer again, it keeps the longer evaluations."""
    spec_file.write_text(SPEC.replace("n_examples = 32\nlate = true", "n_examples = 40\nlate = true"))
    assert main(["reproduce", str(spec_file), "--out", str(out), "--table-only"]) == 0
    table = json.loads((out / "table.json").read_text())  # 32-example late evals are not the spec's 40
    assert all(row["per_seed"]["cw"] == {} and len(row["per_seed"]["pgd20"]) == 2 for row in table["rows"])
    assert main(["reproduce", str(spec_file), "--out", str(out)]) == 0  # extends them: examples 32..39 only
    for path in out.rglob("eval-*-late.json"):
        result = json.loads(path.read_text())
        assert result["data"]["n_examples"] == 40 and [p["examples"] for p in result["parts"]] == [[0, 32], [32, 40]]
    table = json.loads((out / "table.json").read_text())
    assert table["complete"] and all(len(row["per_seed"]["cw"]) == 2 for row in table["rows"])
    assert ("cw (first 40 test examples): linf eps 8/255, 30 steps" in (out / "table.md").read_text() and
            "; examples 0-31 and 32-39 attacked in separate runs (`iat eval --extend`) in 8 of 8 evaluations\n"
            in (out / "table.md").read_text() and "evals" not in table["protocol"]["columns"]["pgd20"])

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("eval-*-late.json")}
    spec_file.write_text(SPEC)  # back to 32 examples: the 40-example evals are kept, not shrunk
    assert main(["reproduce", str(spec_file), "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("examples; kept and not counted") == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("eval-*-late.json")}


@pytest.mark.parametrize("bad, says", [('cells = ["nope"]', "unknown cells ['nope']"),
                                       ('columns = ["natural", "fgsm"]', "columns ['fgsm']"),
                                       ('cells = ["iat", "pgd-at"]', "not a number in cell 'pgd-at'")])
def test_a_sweep_that_names_unknown_cells_columns_or_an_unset_option_is_refused_at_load(spec_file, bad, says):
    key = bad.split(" =")[0]
    text = SPEC.replace(next(line for line in SPEC.split("[[sweeps]]")[1].splitlines() if line.startswith(key)), bad)
    spec_file.write_text(text)
    with pytest.raises(specs.UsageError, match=re.escape(says)):
        specs.load_spec(str(spec_file))


def test_a_cell_trained_with_other_settings_is_never_overwritten(spec_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "table"
    spec = specs.load_spec(str(spec_file))
    run = interrupt_after_first_epoch(spec, out, "pgd-at", 0, monkeypatch)
    spec_file.write_text(SPEC.replace("lr = 0.05", "lr = 0.1"))
    before = (run / "metrics.jsonl").read_text()
    assert main(["reproduce", str(spec_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "0.05" in err[0]
    assert (run / "metrics.jsonl").read_text() == before and not (out / "logs").exists()


def test_bad_specs_fail_in_one_line(tmp_path, capsys):
    cases = {
        "unknown top-level key": SPEC + "\nbogus = 1\n",
        "unknown config key": SPEC.replace("lr = 0.05", "lr = 0.05\nlearning_rate = 1"),
        "compare names a missing cell": SPEC.replace('ours = "iat"', 'ours = "nope"'),
        "duplicate cell": SPEC.replace('name = "iat"', 'name = "pgd-at"'),
        "late first group": SPEC.replace('attacks = "natural,pgd20"', 'attacks = "natural,pgd20"\nlate = true'),
    }
    for what, text in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        assert main(["reproduce", str(path), "--out", str(tmp_path / "o")]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("iat: error:"), (what, err)
    assert main(["reproduce", "c3-cifar10-jpeg", "--gpus", "0,1", "--jobs", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--jobs 3 is more than the 2 GPUs" in capsys.readouterr().err
    assert main(["reproduce", "no-such-table"]) == 2
    assert "c1c2-cifar10-jpeg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


CELLS = SPEC[SPEC.index("[[cells]]"):SPEC.index("[[evals]]")]
CONFIG = SPEC[SPEC.index("[config]"):SPEC.index("[[cells]]")]


@pytest.mark.parametrize("edits", [
    (('seeds = [0, 1]', 'seeds = "x"'), "seeds must be a list, got 'x'"),
    (('seeds = [0, 1]', 'seeds = "12"'), "seeds must be a list"),          # was read as seeds 1 and 2
    (('seeds = [0, 1]', 'seeds = [0.5]'), "seeds must be an integer"),
    (('seeds = [0, 1]', 'seeds = [1, 1]'), "distinct integers"),
    (('seeds = [0, 1]', 'seeds = []'), "non-empty list"),                 # was an IndexError traceback
    (('seeds = [0, 1]', 'seeds = [0, 1]\ncells = 5'), (CELLS, ''), "cells must be a list"),
    (('seeds = [0, 1]', 'seeds = [0, 1]\nconfig = 5'), (CONFIG, ''), "config must be a table"),  # was a traceback
    (('seeds = [0, 1]', 'seeds = [0, 1]\ncheckpoints = "last"'), None),   # one name is fine (was 'l','a','s','t')
    (('attacks = "natural,cw"', 'attacks = "natural,cw,nope"'), "unknown attack 'nope'"),  # found at load
    (('attacks = "natural,pgd20"', 'attacks = "natural,pgd20:steps=x"'), "attack pgd20: steps must be a number"),
    (('attacks = "natural,pgd20"', 'attacks = 5'), "attacks must be a string"),
    (('n_examples = 48', 'n_examples = -3'), "n_examples must be at least 1"),
    (('late = true', 'late = "maybe"'), "late must be"),
    (('name = "iat"', 'name = "../iat"'), "every cell needs a name"),
])
def test_bad_spec_values_fail_at_load_before_any_training(edits, spec_file, tmp_path, capsys):
    *edits, message = edits
    text = SPEC
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    spec_file.write_text(text)
    out = tmp_path / "o"
    if message is None:
        assert specs.load_spec(str(spec_file)).checkpoints == ("last",)
        return
    assert main(["reproduce", str(spec_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iat: error:") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1,x"], "--seeds takes comma-separated integers"),
    (["--seeds", "1,1"], "--seeds names a seed twice"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--out", "{tmp}/file/o"], "is a file, not a folder"),  # was exit 1 after printing the plan
])
def test_bad_reproduce_flags_fail_in_one_line(flags, message, spec_file, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["reproduce", str(spec_file), *([] if "--out" in flags else ["--out", str(tmp_path / "o")]),
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_second_reproduce_of_the_same_table_is_refused(spec_file, tmp_path, capsys):
    """The runner locks its table folder; its `iat train` children lock their own cells (the full runner test
    above runs them under this lock, so the two never wait on each other)."""
    from iat.training.run_dir import lock_path, run_lock

    out = tmp_path / "table"
    with run_lock(out):  # a runner of this table in progress
        assert main(["reproduce", str(spec_file), "--out", str(out), "--no-plots"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0], err
        assert not out.exists()
        assert main(["reproduce", str(spec_file), "--out", str(out), "--dry-run"]) == 0  # reads only
    assert not lock_path(out).exists()


def test_builtin_tables_are_valid_and_listed(capsys):
    tables = specs.builtin_tables()
    assert {"c1c2-cifar10-jpeg", "c1c2-fashion-mnist", "c3-cifar10-jpeg"} <= set(tables)
    for name in tables:
        spec = specs.load_spec(name)
        assert len(spec.seeds) >= 1 and spec.compare
        for cell in spec.cells:
            cfg = spec.train_config(cell, spec.seeds[0])
            assert cfg.method == cell.settings.get("method", spec.config.get("method"))
    assert main(["reproduce", "--list"]) == 0
    assert "c3-cifar10-jpeg" in capsys.readouterr().out


def test_dry_run_prints_the_commands_and_writes_nothing(spec_file, tmp_path, capsys):
    out = tmp_path / "table"
    assert main(["reproduce", str(spec_file), "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.count("iat train --config") == 4 and "4 of 4 cells have work" in err
    assert not out.exists()


def _result(base: list[float], ours: list[float], nat: list[float]) -> dict:
    def stats(d):
        mean = sum(d) / len(d)
        return {"mean": mean, "std": 0.0, "wins": sum(v > 0 for v in d), "seeds": len(d)}

    return {"robust_column": "worst case", "by_checkpoint": {"best": {
        "worst case": stats([o - b for o, b in zip(ours, base, strict=True)]), "natural": stats(nat)}}}


@pytest.mark.parametrize("base,ours,nat,word", [
    ([40, 41, 42], [42, 43, 44], [0.5, -0.2, 0.1], "holds"),
    ([40, 41, 42], [42, 40, 45], [0.5, -0.2, 0.1], "mixed"),       # higher on average, not in every seed
    ([40, 41, 42], [42, 43, 44], [-2.0, -1.5, -1.0], "mixed"),     # robust gain bought with natural accuracy
    ([40, 41, 42], [39, 41, 41], [0.0, 0.0, 0.0], "does not hold"),
])
def test_verdict_rules(base, ours, nat, word):
    verdict = table._verdict(_result(base, ours, nat), specs.Compare("C1", "a", "b"), {}, 3)
    assert verdict.split(":")[0] == word
    early = table._verdict(_result(base, ours, nat), specs.Compare("C1", "a", "b"), {}, 5)
    assert early.startswith("no verdict yet: 3 of 5 seeds")  # a table still running claims nothing


def test_paste_into_replaces_only_its_block(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    render_table.paste_into(doc, "t1", "first\n")
    render_table.paste_into(doc, "t2", "other\n")
    render_table.paste_into(doc, "t1", "second\n")
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n") and "second" in text and "first" not in text
    assert text.index("second") < text.index("other") and text.count("iat reproduce t1: begin") == 1


def _running(text: str) -> list[int]:
    """Live (not zombie) processes whose command line mentions text (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace") \
                    and "\nState:\tZ" not in (proc / "status").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_sigterm_stops_the_runner_and_its_iat_children(spec_file, tmp_path):
    out = tmp_path / "table"
    spec_file.write_text(SPEC.replace("epochs = 2", "epochs = 500"))  # minutes of training: it must be cut short
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, "-m", "iat", "reproduce", str(spec_file), "--out", str(out),
                               "--no-plots"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not [p for p in _running(str(out)) if p != runner.pid]:  # an `iat train` child has started
        assert runner.poll() is None and time.monotonic() < deadline, runner.stderr.read()
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 130 and "interrupted" in runner.stderr.read()
    time.sleep(0.5)
    assert _running(str(out)) == []  # no orphaned training keeps writing into the cell
    assert not (out / "table.json").exists()


def test_every_shipped_spec_and_config_states_its_eps():
    """Data-set standard threat models apply only without an eps: the shipped tables and configs give one, so
    their runs (and the committed tables built from them) mean what they meant before the standards."""
    from iat import config as C
    from iat.data import resolve_threat

    root = Path(__file__).resolve().parents[1]
    for name in specs.builtin_tables():
        spec = specs.load_spec(name)
        assert "eps" in spec.config["threat"], name
        generic = C.from_dict(spec.config).threat  # what a table's config meant before the standards
        assert all(spec.train_config(c, 0).threat == generic for c in spec.cells if not specs._threat_keys(c.settings))
    for path in sorted(root.glob("configs/**/*.toml")):
        cfg = C.from_dict(C.read_config_file(path))
        assert resolve_threat(cfg.data.name, cfg.threat, set(C.read_config_file(path).get("threat", {})))[1] == \
            "as given", path


def test_dry_run_shows_settings_the_late_phase_and_a_timed_estimate(spec_file, tmp_path, capsys):
    out = tmp_path / "table"
    assert main(["reproduce", str(spec_file), "--out", str(out), "--dry-run", "--jobs", "2", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "  iat: iat (steps_inv=1), cnn on synthetic (val_size 64), 2 epochs x batch 64" in err
    assert "late phase, after every cell has trained: natural,cw on 32 test examples, checkpoints best, last" in err
    estimate = re.search(r"  pgd-at: (\d+) ms/step x (\d+) steps x 2 epochs x 2 seed\(s\)", err)
    assert estimate and int(estimate.group(2)) > 0 and "training in all: about" in err
    assert not out.exists()  # a plan writes nothing
    assert main(["reproduce", str(spec_file), "--out", str(out), "--dry-run", "--no-estimate"]) == 0
    assert "ms/step" not in capsys.readouterr().err


def test_a_cell_whose_model_no_attack_changes_does_not_avoid_overfitting():
    """uiat-fgsm-at-inv on C3 "avoided" catastrophic overfitting in 2 of 3 seeds by collapsing to a constant
    classifier (natural = PGD = CW = 10%): the overfitting rule alone said "holds"."""
    def row(cell, natural, worst):
        return {"cell": cell, "checkpoint": "last", "per_seed": {"natural": natural, "worst case": worst}}

    ours = row("b", {0: 0.362, 1: 0.10, 2: 0.10}, {0: 0.016, 1: 0.10, 2: 0.10})
    assert table.unattackable_seeds(ours, "worst case") == [1, 2]
    assert table.unattackable_seeds(row("b", {0: 0.0}, {0: 0.0}), "worst case") == []  # nothing right: no claim
    cells = {"a": {s: {"co_epochs": [5, 6], "epoch_seconds": 10.0} for s in range(3)},
             "b": {s: {"co_epochs": [], "epoch_seconds": 10.0} for s in range(3)}}
    cmp = specs.Compare("C3", "a", "b", kind="overfitting")
    result = _result([40, 41, 42], [42, 43, 44], [0.0, 0.0, 0.0])
    assert table._verdict(result, cmp, cells, 3).startswith("holds: catastrophic overfitting in 3/3 seeds of a, 0/3")
    result["unattackable_seeds"] = [1, 2]
    verdict = table._verdict(result, cmp, cells, 3)
    assert verdict.startswith("does not hold:") and "in 2/3 seeds of b no attack changed any prediction" in verdict
