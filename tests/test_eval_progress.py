"""Long evaluations show progress (per attack and per batch, AutoAttack per component), never overwrite a
different evaluation silently, and eps sweeps default to a size that finishes in minutes."""
import json
import logging

import pytest
import torch

from cli_helpers import FAST, train_tiny
from iat.attacks import Natural, create_attack
from iat.cli import main
from iat.evaluation import accuracy, pipeline


class Bar:
    """Stands in for tqdm: records the total, every update and every postfix."""

    made = []

    def __init__(self, *args, total=None, disable=False, **kwargs):
        self.total, self.disable, self.n, self.postfixes = total, disable, 0, []
        Bar.made.append(self)

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text):
        self.postfixes.append(text)

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    Bar.made = []
    monkeypatch.setattr(accuracy, "tqdm", Bar)
    return Bar.made



def _data(n=30):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_the_bar_counts_every_attack_of_every_batch(tiny_model, bars):
    x, y = _data(30)  # 3 batches of 12, 12, 6
    attacks = {"natural": Natural(), "fgsm": create_attack("fgsm", eps=8 / 255),
               "pgd20": create_attack("pgd20", eps=8 / 255)}
    accuracy.robust_accuracy(tiny_model, x, y, attacks, batch_size=12, progress=True)
    (bar,) = bars
    assert bar.total == 3 * 3 and bar.n == 9 and not bar.disable
    assert "batch 3/3 pgd20" in bar.postfixes and "batch 1/3 fgsm" in bar.postfixes


def test_no_progress_disables_the_bar(tiny_model, bars):
    x, y = _data(8)
    accuracy.robust_accuracy(tiny_model, x, y, {"natural": Natural()}, batch_size=4, progress=False)
    assert bars[0].disable and bars[0].total == 2


def test_autoattack_shows_its_components_per_batch(tiny_model, bars):
    pytest.importorskip("pyautoattack")
    x, y = _data(16)
    attacks = {"natural": Natural(), "autoattack": create_attack("autoattack", eps=8 / 255)}
    accuracy.robust_accuracy(tiny_model, x, y, attacks, batch_size=8, progress=True,
                             generator=torch.Generator().manual_seed(0))
    (bar,) = bars
    assert bar.total == 2 * 2 and bar.n == 4
    notes = [p for p in bar.postfixes if p.startswith("batch 2/2 autoattack: ")]
    assert "batch 2/2 autoattack: apgd-ce (1/4)" in notes  # the component, named while it runs
    assert any("apgd-ce batch 1/1 broke" in p for p in notes)  # and what it broke


def test_autoattack_flags_keep_their_text_and_lose_the_dead_link():
    checks = pytest.importorskip("pyautoattack.checks")
    logger = logging.getLogger("test-aa-flags")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        checks.check_zero_gradients(torch.zeros(3, 4), logger=logger)  # the package's own message
    finally:
        logger.removeHandler(handler)
    aa = create_attack("autoattack", eps=8 / 255)
    aa._record(records)
    (flag,) = aa.diagnostics()["flags"]
    assert "flags_doc.md" in records[0].getMessage()
    assert "flags_doc.md" not in flag and "3 points with zero gradient" in flag and "gradient masking" in flag


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    flags = [*FAST[:FAST.index("--steps")], "--steps", "1", "--eps", "8/255", "--step-size", "8/255", "--no-progress"]
    return train_tiny(tmp_path_factory.mktemp("runs") / "r", "standard", flags)


def _eval(run, *args):
    return main(["eval", str(run), "--no-progress", *args])


def test_another_evaluation_is_refused_before_it_runs(run, monkeypatch, capsys):
    assert _eval(run, "--attacks", "natural,fgsm", "--n-examples", "32") == 0
    path = run / "eval-best.json"
    first = json.loads(path.read_text())["seconds"]
    assert _eval(run, "--attacks", "natural,fgsm", "--n-examples", "32") == 0  # the same one: replaced
    before = path.read_text()
    assert json.loads(before)["seconds"] != first
    capsys.readouterr()

    def never(*a, **k):
        raise AssertionError("the evaluation ran before the refusal")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "robust_accuracy", never)
        for args, says in ((["--attacks", "natural,fgsm", "--n-examples", "16"], "32 examples (this one: 16)"),
                           (["--attacks", "natural,pgd20", "--n-examples", "32"], "attacks natural,fgsm"),
                           (["--attacks", "natural,fgsm", "--n-examples", "32", "--eps", "4/255"], "threat model"),
                           (["--attacks", "natural,fgsm", "--n-examples", "32", "--worst-case-only"], "mode each")):
            assert _eval(run, *args) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and str(path) in err and says in err
            assert "--out FILE" in err and "--overwrite" in err
    assert json.loads(path.read_text()) == json.loads(before)
    assert _eval(run, "--attacks", "natural,fgsm", "--n-examples", "16", "--overwrite") == 0
    assert json.loads(path.read_text())["data"]["n_examples"] == 16


def test_an_explicit_out_follows_the_same_rule(run, tmp_path, capsys):
    out = tmp_path / "mine.json"
    assert _eval(run, "--attacks", "natural", "--n-examples", "8", "--out", str(out)) == 0
    assert _eval(run, "--attacks", "natural", "--n-examples", "8", "--out", str(out)) == 0
    capsys.readouterr()
    assert _eval(run, "--attacks", "natural", "--n-examples", "12", "--out", str(out)) == 2
    assert str(out) in capsys.readouterr().err
    out.write_text("{}")
    assert _eval(run, "--attacks", "natural", "--n-examples", "8", "--out", str(out)) == 2
    assert "not an evaluation" in capsys.readouterr().err


def test_a_checkpoint_of_another_epoch_is_refused(run, tmp_path, capsys):
    out = tmp_path / "epoch.json"
    assert _eval(run, "--attacks", "natural", "--n-examples", "8", "--out", str(out)) == 0
    record = json.loads(out.read_text())
    record["checkpoint_epoch"] = 7  # as if the run had been trained further since
    out.write_text(json.dumps(record))
    capsys.readouterr()
    assert _eval(run, "--attacks", "natural", "--n-examples", "8", "--out", str(out)) == 2
    assert "checkpoint epoch 7 (this one: 1)" in capsys.readouterr().err


def test_a_bare_eps_sweep_is_capped_and_printed(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "SWEEP_N_DEFAULT", 40)  # the synthetic test split has 256 examples, not 10,000
    out = tmp_path / "sweep.json"
    assert _eval(run, "--attacks", "natural", "--eps-sweep", "0,8/255,1", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["data"]["n_examples"] == 256 and result["results"][0]["total"] == 256
    assert [p["total"] for p in result["eps_sweep"]["points"]] == [40, 40, 40]
    printed = capsys.readouterr().out
    table, checks = printed.split("accuracy against eps (pgd20, linf, first 40 test examples):")[1].split("PASS", 1)
    natural = result["eps_sweep"]["points"][0]["correct"]
    assert f"{natural}/40" in table and "8/255" in table and "0/40" in table
    # with --n-examples the sweep runs on all of them; --sweep-n-examples sets it
    assert _eval(run, "--attacks", "natural", "--eps-sweep", "0,1", "--n-examples", "60", "--out", str(out),
                 "--overwrite") == 0
    assert json.loads(out.read_text())["eps_sweep"]["points"][0]["total"] == 60
    assert _eval(run, "--attacks", "natural", "--eps-sweep", "0,1", "--n-examples", "60", "--sweep-n-examples",
                 "20", "--out", str(out)) == 0
    assert json.loads(out.read_text())["eps_sweep"]["points"][0]["total"] == 20
