"""Table specs that extend another: merged [config] tables, cells and evals merged by name, dropped cells
taken out of compares and sweeps, and every way of getting it wrong refused in one line."""
import dataclasses

import pytest

from iat.cli import main
from iat.errors import UsageError
from iat.reproduce import spec as specs
from test_reproduce import SPEC


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "base.toml", SPEC)


def test_a_child_merges_config_replaces_and_adds_cells_and_drops(tmp_path, base):
    child = write(tmp_path, "child.toml", """
extends = "base.toml"
seeds = [3]
drop_cells = ["iat"]
[config.optim]
epochs = 5
[[cells]]
name = "pgd-at"
method = "trades"
[[cells]]
name = "iat-2"
method = "iat"
method_options = { steps_inv = 2 }
[[evals]]
name = "late"
attacks = "natural,cw"
n_examples = 16
late = true
[[compare]]
claim = "new"
base = "pgd-at"
ours = "iat-2"
""")
    parent, spec = specs.load_spec(str(base)), specs.load_spec(str(child))
    assert spec.name == "child" and spec.seeds == [3] and spec.title == parent.title
    assert spec.config["optim"] == dict(parent.config["optim"], epochs=5)            # merged key by key
    assert spec.config["data"] == parent.config["data"]
    assert [(c.name, c.settings.get("method")) for c in spec.cells] == [("pgd-at", "trades"), ("iat-2", "iat")]
    assert [(g.name, g.n_examples) for g in spec.evals] == [("", 48), ("late", 16)]  # replaced by name
    assert [(c.claim, c.base, c.ours) for c in spec.compare] == [("new", "pgd-at", "iat-2")]  # C1 named iat
    assert spec.sweeps == []  # its one swept cell was dropped


def test_dropping_a_swept_cell_removes_its_point_and_a_dropped_reference(tmp_path, base):
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\ndrop_cells = ["pgd-at"]\n')
    spec = specs.load_spec(str(child))
    assert [c.name for c in spec.cells] == ["iat"] and spec.compare == []
    assert spec.sweeps[0].cells == ["iat"] and spec.sweeps[0].reference is None


def test_a_chain_of_extends_and_an_identical_compare_kept_once(tmp_path, base):
    write(tmp_path, "mid.toml", 'extends = "base.toml"\n[config.optim]\nepochs = 3\n')
    child = write(tmp_path, "child.toml", 'extends = "mid.toml"\n[config.optim]\nlr = 0.01\n'
                  '[[compare]]\nclaim = "C1"\nbase = "pgd-at"\nours = "iat"\n')
    spec = specs.load_spec(str(child))
    assert (spec.config["optim"]["epochs"], spec.config["optim"]["lr"]) == (3, 0.01)
    assert len(spec.compare) == 1


@pytest.mark.parametrize("text, words", [
    ('extends = "child.toml"\n', "loop"),
    ('extends = "no-such-table"\n', "no table 'no-such-table'"),
    ('extends = "base.toml"\ndrop_cells = ["nope"]\n', "drop_cells names ['nope']"),
    ('drop_cells = ["iat"]\n' + SPEC, "drop_cells needs extends"),
    ('extends = 3\n', "extends must name"),
    ('extends = "base.toml"\n[config.optim]\nno_such = 1\n', "no_such"),
])
def test_bad_extends_is_one_line(tmp_path, base, text, words):
    child = write(tmp_path, "child.toml", text)
    with pytest.raises(UsageError) as err:
        specs.load_spec(str(child))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_loop_through_two_files_is_refused_by_the_cli(tmp_path, capsys):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    assert main(["reproduce", str(b), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loop" in err and len(err.splitlines()) == 1


def test_the_builtin_extending_specs_are_the_base_with_their_changes():
    base = specs.load_spec("anchor-fashion-mnist")
    six = specs.load_spec("anchor-fashion-mnist-6ep")
    assert six.config == specs.extend_spec({"config": base.config}, {"config": {"optim": {"epochs": 6}}})["config"]
    assert [c.name for c in six.cells] == ["pgd-at", "iat-eps_inv-0", "iat-eps_inv-0.1"] and six.seeds == [0]
    assert [(g.name, g.n_examples) for g in six.evals] == [("", 1000), ("aa", 200)]
    assert "iat-eps_inv-0.05" not in {c.ours for c in six.compare} | set(six.sweeps[0].cells)
    cekl = specs.load_spec("anchor-fashion-mnist-cekl")
    assert cekl.config == base.config and cekl.seeds == base.seeds and cekl.evals == base.evals
    assert [dataclasses.asdict(c) for c in cekl.cells[:4]] == [dataclasses.asdict(c) for c in base.cells]
    for cell in cekl.cells[4:]:
        assert cell.settings["method_options"]["inverse_loss"] == "ce+kl"
