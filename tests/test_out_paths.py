"""`iat eval --out` that cannot be written is refused before any attack runs; a long --out folder gets a lock."""
import os
import time

import pytest

from cli_helpers import FAST, train_tiny
from iat.cli import main
from iat.training.run_dir import lock_path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "pgd-at", "pgd-at")


def _eval_refused(run, out, capsys, monkeypatch, *extra):
    import iat.evaluation.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(pipeline, "evaluate_prepared", boom)
    before = set(run.iterdir())
    start = time.monotonic()
    code = main(["eval", str(run), "--attacks", "pgd20", "--n-examples", "32", "--out", str(out), "--no-progress", *extra])
    assert code == 2 and time.monotonic() - start < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("iat: error:") and str(out) in err
    assert set(run.iterdir()) == before  # no eval output written
    return err


def test_eval_out_a_folder_is_refused_before_evaluating(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    out.mkdir()
    err = _eval_refused(run, out, capsys, monkeypatch, "--overwrite")  # check_replace is skipped
    assert "folder" in err
    assert out.is_dir() and not list(out.iterdir()) and not list(tmp_path.glob("results.*.*"))


def test_eval_out_a_symlink_loop_is_refused(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "loop.json"
    os.symlink(out.name, out)
    _eval_refused(run, out, capsys, monkeypatch)
    assert out.is_symlink()


def test_lock_of_a_long_folder_name_fits_and_is_unique(tmp_path):
    a, b = tmp_path / ("a" * 249 + "x"), tmp_path / ("a" * 249 + "y")
    la, lb = lock_path(a), lock_path(b)
    assert len(os.fsencode(la.name)) <= 255 and la.name.endswith(".iat-lock") and la.parent == tmp_path
    assert la != lb
    la.touch()  # really creatable
    assert lock_path(tmp_path / "run") == tmp_path / ".run.iat-lock"  # ordinary names unchanged


def test_train_into_a_250_byte_folder_name(tmp_path):
    out = tmp_path / ("r" * 250)
    assert main(["train", "--method", "standard", *FAST, "--out", str(out)]) == 0
    assert (out / "config.json").exists()
