"""Issue 26: `iat train --overwrite` never leaves a half-removed run, and a run in use says so.

iat 0.1 deleted the old checkpoints and then failed on a file it could not remove (an immutable file), so the
old run was gone and no new one existed; and a refused train into a running run directory told the user to
pass --overwrite, which cannot help while another iat holds the run.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from iat.cli import main
from test_bad_input import _hold_lock_in_a_child

TINY = ["train", "--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1",
        "--val-examples", "16", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_run(folder: Path, capsys) -> Path:
    out = folder / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    (out / "eval-best.json").write_text("{}")  # as iat eval writes beside a run
    capsys.readouterr()
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("iat: error: "), err
    return err


def test_overwrite_that_cannot_move_one_old_file_keeps_the_whole_old_run(tmp_path, capsys, monkeypatch):
    """One old file the OS refuses to remove or move (PermissionError): exit 2, one line naming it, and every
    old file still in place; the same command succeeds once the obstacle is gone."""
    out = _old_run(tmp_path, capsys)
    before = snapshot(out)
    stuck = out / "config.json"  # after checkpoints/ and metrics.jsonl in the order a run's files are replaced
    real_unlink, real_rename, real_rmtree = os.unlink, os.rename, shutil.rmtree

    def refuse(path) -> None:
        if Path(path) == stuck:
            raise PermissionError(1, "Operation not permitted", str(path))

    def unlink(path, *args, **kwargs):
        refuse(path)
        return real_unlink(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        refuse(src)
        return real_rename(src, dst, *args, **kwargs)

    def path_unlink(self, missing_ok=False):
        refuse(self)
        try:
            real_unlink(self)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(path, *args, **kwargs):
        if stuck.is_relative_to(Path(path)):
            raise PermissionError(1, "Operation not permitted", str(stuck))
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", unlink)
        m.setattr(os, "remove", unlink)
        m.setattr(os, "rename", rename)
        m.setattr(os, "replace", rename)
        m.setattr(Path, "unlink", path_unlink)
        m.setattr(shutil, "rmtree", rmtree)
        assert main([*TINY, "--out", str(out), "--overwrite"]) == 2
        err = _one_line_error(capsys)
    assert str(stuck) in err and "--overwrite" in err
    assert snapshot(out) == before, "the old run lost files"
    assert sorted(p.name for p in out.iterdir()) == sorted({p.split("/")[0] for p in before}), \
        "something was left beside the old run"
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 0  # nothing refuses now: replaced
    assert not (out / "eval-best.json").exists() and (out / "checkpoints" / "last.safetensors").is_file()


def _chattr_location(tmp_path: Path) -> Path:
    """A folder on a file system where `chattr +i` works (tmp_path, else under /work), or skip."""
    for base in (tmp_path, Path("/work")):
        try:
            folder = Path(tempfile.mkdtemp(prefix="iat-chattr-", dir=base))
        except OSError:
            continue
        probe = folder / "probe"
        probe.write_text("x")
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0 \
            if shutil.which("chattr") else False
        if ok:
            subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
            try:
                probe.unlink()
            except OSError:
                pass
        if ok:
            return folder
        shutil.rmtree(folder, ignore_errors=True)
    pytest.skip("chattr +i is not supported here (no chattr, or a file system such as tmpfs without it)")


def test_overwrite_with_an_immutable_old_checkpoint_removes_nothing(tmp_path, capsys):
    """A real immutable file (`chattr +i`, which stops root too) deep in the old run's checkpoints/."""
    folder = _chattr_location(tmp_path)
    stuck = None
    try:
        out = _old_run(folder, capsys)
        stuck = out / "checkpoints" / "best.safetensors"
        assert subprocess.run(["chattr", "+i", str(stuck)]).returncode == 0
        before = snapshot(out)
        assert main([*TINY, "--out", str(out), "--overwrite"]) == 2
        err = _one_line_error(capsys)
        assert str(stuck) in err and "chattr -i" in err
        assert snapshot(out) == before, "the old run lost files"
        assert sorted(p.name for p in out.iterdir()) == sorted({p.split("/")[0] for p in before})
        subprocess.run(["chattr", "-i", str(stuck)])
        assert main([*TINY, "--out", str(out), "--overwrite"]) == 0  # as the message says: then it works
        assert not (out / "eval-best.json").exists()
    finally:
        if stuck is not None:
            subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)




def test_a_run_in_use_is_not_offered_overwrite(tmp_path, capsys):
    """With a live iat holding the run, plain, --overwrite and --resume all say it is in use by that pid and to
    wait for it or stop it, never to pass --overwrite; nothing in the run changes."""
    out = _old_run(tmp_path, capsys)
    before = snapshot(out)
    holder = _hold_lock_in_a_child(out)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            args = ["train", "--resume", str(out), "--no-progress"] if extra == ["--resume"] \
                else [*TINY, "--out", str(out), *extra]
            assert main(args) == 2, extra
            err = _one_line_error(capsys)
            assert f"in use by a running iat (pid {holder.pid})" in err, err
            assert "wait" in err and "stop" in err, err
            assert "--overwrite" not in err and "--resume" not in err, err
            assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
