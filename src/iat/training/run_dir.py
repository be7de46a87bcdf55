"""A run directory's life: a new run, a resumed one (--resume) or a replaced one (--overwrite).

Everything that can be wrong with the input is found before anything in the folder is created or
replaced: building the Trainer loads the data and builds model and method; a folder that already holds a
run is never replaced without `overwrite`; a resumed run keeps the settings in its config.json.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from ..errors import UsageError
from ..records import RunRecord, read_run
from ..runtime.checkpoint import load_checkpoint
from ..runtime.distributed import launch_rank

RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")
EVAL_FILES = ("eval-*.json", "eval-*.csv", "eval-*.md", "eval-*-eps-sweep.png")  # what iat eval writes beside a run


def holds_run(out: Path) -> bool:
    """A folder holds a run if iat wrote any of its files there (a lone metrics.jsonl counts too); what an
    interrupted write left behind (`leftovers`) and an empty checkpoints/ folder do not count."""
    stale = set(leftovers(out))
    for name in RUN_FILES:
        path = out / name
        if name == "checkpoints" and path.is_dir() and not path.is_symlink():
            if any(p not in stale for p in path.iterdir()):
                return True
        elif path.exists():
            return True
    return False


def leftovers(out: Path) -> list[Path]:
    """What a process killed while writing a run's files leaves: the temporary files of `records`'
    atomic writes (.NAME.XXXXXXXX.tmp beside config.json, metrics.jsonl or a checkpoint) and the folder an
    interrupted --overwrite moved the old files to (.iat-replaced-*). Whoever holds the run lock may remove them:
    every writer of a run's files holds it."""
    found: list[Path] = []
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            name = path.name
            if folder == out and name.startswith(".iat-replaced-") and path.is_dir() and not path.is_symlink():
                found.append(path)
            elif name.startswith(".") and name.endswith(".tmp") and path.is_file() and not path.is_symlink():
                target = name[1:-len(".tmp")].rsplit(".", 1)[0]  # .NAME.XXXXXXXX.tmp -> NAME
                if (target in ("config.json", "metrics.jsonl") if folder == out else target.endswith(".safetensors")):
                    found.append(path)
    return sorted(found)


def remove_leftovers(out: Path) -> None:
    """Remove `leftovers(out)` (under the run lock), and checkpoints/ if that leaves it empty."""
    for path in leftovers(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()


def saved_run(out: Path) -> RunRecord:
    """The settings a run saved in its config.json (or, if that was deleted, in its last checkpoint)."""
    path, last = out / "config.json", out / "checkpoints" / "last.safetensors"
    if not path.exists() and not last.is_file():
        raise UsageError(f"--resume: {out} holds no run to continue (no config.json); start one with --out {out}")
    try:
        record = read_run(path) if path.exists() else RunRecord.from_dict(load_checkpoint(last).get("resolved"),
                                                                           str(last))
        C.from_dict(record.config)
    except UsageError as err:
        raise UsageError(f"--resume: {err}") from None
    return record


def train(cfg: C.TrainConfig, out: Path, *, saved: Optional[RunRecord] = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` into `out`: a new run, the continuation of `saved` (from saved_run), or a replacement."""
    from .trainer import Trainer

    exists = holds_run(out)
    if saved is not None and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pass only one of them")
    if launch_rank() == 0:  # rank 0 checks and locks the folder for every rank; one that starts later finds it taken
        _check_out(out, exists, saved, overwrite)
    trainer = Trainer(cfg, out)  # every bad input fails here, before anything in `out` changes
    main_rank = trainer.dist.is_main  # under torchrun only rank 0 touches the run directory
    with run_lock(out) if main_rank else nullcontext():
        if main_rank and holds_run(out) and not exists:  # another process started a run here while we loaded
            what = ("run the command again to replace it" if overwrite
                    else "pass --resume to continue it or --overwrite to replace it")
            raise UsageError(f"{out} already holds a run (started meanwhile by another process, which the "
                             f"--overwrite you gave did not see); {what}" if overwrite else
                             f"{out} already holds a run (started meanwhile by another process); {what}")
        if main_rank:
            remove_leftovers(out)  # an interrupted write's temporary files: under the lock, nobody else's
        if saved is not None and (out / "checkpoints" / "last.safetensors").exists():
            trainer.resume()
        elif saved is not None:
            trainer.check_same_run(saved, out / "config.json")
            if main_rank:
                print(f"iat: {out} holds no checkpoint yet; starting the run from the beginning", file=sys.stderr)
                clear(out)
        elif exists and main_rank:
            clear(out)
        return trainer.fit()  # starts with a barrier, so no rank trains before the directory is cleared


def _check_out(out: Path, exists: bool, saved: Optional[RunRecord], overwrite: bool) -> None:
    """What rank 0 checks before it trains into `out` (`exists`: it holds a run): not in use, no run lost unless
    --resume or --overwrite, nothing of others in it, writable, and removable if it is to be overwritten."""
    holder = lock_holder(out)
    if holder is not None:  # a run in progress: neither --resume nor --overwrite would help
        raise UsageError(_in_use(out, holder, "--out"))
    if exists and saved is None and not overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    ours = set(leftovers(out)) | {out / "checkpoints"}
    if not exists and out.is_dir() and any(not p.name.endswith(".iat-lock") and p not in ours for p in out.iterdir()):
        raise UsageError(f"{out} holds files that are not an iat run; choose a new or empty folder as --out")
    check_writable(out)
    if exists and overwrite:
        check_removable(out)  # an old file that cannot be removed fails here, before anything is removed


def lock_path(out: Path) -> Path:
    """Beside the folder or file it guards, so taking the lock creates nothing inside a run directory."""
    name = f".{out.name}.iat-lock"
    if len(os.fsencode(name)) > 255:  # NAME_MAX: a legal long folder name must still get a lock of its own
        raw = os.fsencode(out.name)
        digest = hashlib.sha256(raw).hexdigest()[:16]
        head = raw[:200].decode("utf-8", "ignore")  # never split a multi-byte character
        name = f".{head}-{digest}.iat-lock"
    return out.parent / name


@contextmanager
def run_lock(out: Path, what: str = "--out") -> Iterator[None]:
    """An OS lock on `out` (a run directory, an eval's results, a reproduce table's folder) held while a
    command writes it: a second writer gets a one-line error naming the holder's pid. The kernel drops the
    lock of a process that dies, so a stale lock file is simply taken over; the file is removed on release."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ctrl-C / SIGTERM wait while the lock is taken, so that one arriving between the lock file's creation and
    # the `try` below (a loaded machine) still removes it: the pending signal is handled inside the `try`.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        fd = _acquire(path, out, what)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it; a waiter that opened this file retries
        os.close(fd)  # releases the lock


def _acquire(path: Path, out: Path, what: str) -> int:
    """A locked descriptor of the file now at `path` (a file unlinked by its releasing holder is retried)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(_in_use(out, holder, what)) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _in_use(out: Path, holder: str, what: str) -> str:
    """A running command holds `out`: say so and what to do (neither --resume nor --overwrite would help)."""
    who, stop = (f"pid {holder}", f"stop it (kill {holder})") if holder.isdigit() else (holder, "stop it")
    return f"{out} is in use by a running iat ({who}); wait for it to finish or {stop}, or choose another {what}"


def lock_holder(out: Path) -> Optional[str]:
    """The pid (as written in the lock file) of a live process holding `out`'s run lock, else None."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def old_files(out: Path) -> list[Path]:
    """What --overwrite removes: exactly what an earlier run and its evaluations wrote; nothing else in `out`."""
    paths = [out / name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    return paths + sorted(p for pattern in EVAL_FILES for p in out.glob(pattern))


_FS_IOC_GETFLAGS, _IMMUTABLE, _APPEND_ONLY = 0x80086601, 0x10, 0x20


def _inode_flags(path: Path) -> int:
    """The file's chattr flags (0 where the file system has none or the file cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
    except OSError:
        return 0
    finally:
        os.close(fd)


def check_removable(out: Path) -> None:
    """Fail before anything is removed if any old file of the run cannot be: an immutable or append-only
    file (chattr +i / +a; root too is refused) or a folder this process cannot write in."""
    todo: list[Path] = []
    for top in old_files(out):
        todo.append(top)
        if top.is_dir() and not top.is_symlink():
            for root, dirs, files in os.walk(top):
                todo.extend(Path(root) / n for n in dirs + files)
    folders = {out} | {p.parent for p in todo} | {p for p in todo if p.is_dir() and not p.is_symlink()}
    for path in todo:
        flags = _inode_flags(path) if not path.is_symlink() else 0
        if flags & (_IMMUTABLE | _APPEND_ONLY):
            kind, fix = ("immutable", "chattr -i") if flags & _IMMUTABLE else ("append-only", "chattr -a")
            raise UsageError(f"--overwrite: {path} cannot be removed (it is {kind}); run `{fix} {path}` and try "
                             "again; nothing was removed")
    for folder in sorted(folders):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise UsageError(f"--overwrite: cannot remove files in {folder} ({err.strerror}); fix its permissions "
                             f"(e.g. chmod u+rwx {folder}) and try again; nothing was removed") from None


def clear(out: Path) -> None:
    """Remove exactly what an earlier run and its evaluations wrote (--overwrite); nothing else in `out`.
    The old files are first moved aside into one folder inside `out` (a rename each, undone if any fails),
    so a file that cannot be moved leaves the old run whole; only then is that folder removed."""
    check_removable(out)
    paths = old_files(out)
    if not paths:
        return
    aside = Path(tempfile.mkdtemp(prefix=".iat-replaced-", dir=out))
    moved: list[tuple[Path, Path]] = []
    try:
        for i, path in enumerate(paths):
            target = aside / f"{i}-{path.name}"
            os.rename(path, target)
            moved.append((path, target))
    except OSError as err:
        for path, target in reversed(moved):
            os.rename(target, path)
        aside.rmdir()
        raise UsageError(f"--overwrite: {err.filename or path} cannot be removed ({err.strerror}); fix that (e.g. "
                         f"`chattr -i {err.filename or path}` or its permissions) and try again; nothing was "
                         "removed") from None
    try:
        shutil.rmtree(aside)
    except OSError as err:
        raise UsageError(f"--overwrite: could not remove the old run's files moved aside to {aside} "
                         f"({err.strerror}: {err.filename}); remove that folder yourself") from None


def check_writable(out: Path, flag: str = "--out") -> None:
    """Fail before any work: `out` (given as `flag`) must be, or be creatable in, a folder we can really write
    to; a symbolic link on the way that leads nowhere (a loop, a missing target) is named as such."""
    for part in (out, *out.parents):
        if part.is_symlink() and not part.exists():
            raise UsageError(f"{part} is a symbolic link that leads nowhere (a loop, or its target is missing); "
                             f"fix or remove the link, or choose another {flag}")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = f"{out} is a file" if probe == out else f"cannot create {out}: {probe} is a file"
        raise UsageError(f"{where}, not a folder; choose another {flag}")
    try:  # a real write, because as root os.access says yes even on a read-only mount
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {probe} ({err.strerror}); choose another {flag}") from None
