"""A process killed while writing a run's files (kill -9 during the first config.json, a checkpoint or an
--overwrite) leaves temporary files. They no longer make the folder unusable (before, neither --out, with or
without --overwrite, nor --resume would take it), and the next run removes them."""
import os
import signal
import subprocess
import sys
import time

from cli_helpers import FAST, train_tiny

from iat.cli import main
from iat.training.run_dir import holds_run, leftovers


def _killed_during_first_write(out):
    """What kill -9 during a new run's first writes leaves: the atomic writer's temporary files."""
    (out / "checkpoints").mkdir(parents=True)
    (out / ".config.json.k2j4h1xq.tmp").write_text('{"kind": "iat-run", "conf')  # half written
    (out / "checkpoints" / ".last.safetensors.a8f0c2zz.tmp").write_bytes(b"\0" * 100)
    (out / ".iat-replaced-3kx9").mkdir()


def test_a_folder_with_only_leftovers_takes_a_new_run_and_is_cleaned(tmp_path, capsys):
    out = tmp_path / "run"
    _killed_during_first_write(out)
    assert not holds_run(out) and len(leftovers(out)) == 3
    assert main(["train", "--resume", str(out)]) == 2  # nothing to continue: says to start one with --out
    assert f"start one with --out {out}" in capsys.readouterr().err
    train_tiny(out)
    assert leftovers(out) == [] and (out / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]


def test_resume_removes_a_stale_checkpoint_tmp(tmp_path):
    out = train_tiny(tmp_path / "run")
    stale = out / "checkpoints" / ".last.safetensors.q1w2e3r4.tmp"
    stale.write_bytes(b"\0" * 10)
    assert leftovers(out) == [stale]
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # finished: nothing to train, cleaned
    assert not stale.exists() and leftovers(out) == []


def test_files_of_others_still_refuse_the_folder(tmp_path, capsys):
    """Only iat's own temporary files count as leftovers: an eval's or a stranger's file is not one."""
    out = tmp_path / "run"
    _killed_during_first_write(out)
    (out / ".eval-best.json.abc.tmp").write_text("{}")  # an eval's, not the training run's
    assert main(["train", *FAST, "--method", "standard", "--out", str(out)]) == 2
    assert "holds files that are not an iat run" in capsys.readouterr().err
    assert (out / ".config.json.k2j4h1xq.tmp").exists()  # nothing removed


def test_a_real_kill_during_training_leaves_a_folder_that_resumes(tmp_path):
    """kill -9 at a random moment of a short run: whatever is left, --resume or --out (new) takes it."""
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "iat", "train", "--method", "standard", *FAST, "--epochs", "3",
                              "--checkpoint-every", "1", "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    args = ["train", "--resume", str(out), "--no-progress"] if holds_run(out) else \
        ["train", "--method", "standard", *FAST, "--out", str(out)]
    assert main(args) == 0
    assert leftovers(out) == []
