"""A run directory's life: a new run, a resumed one (--resume) or a replaced one (--overwrite).

Everything that can be wrong with the input is found before anything in the folder is created or
replaced: building the Trainer loads the data and builds model and method; a folder that already holds a
run is never replaced without `overwrite`; a resumed run keeps the settings in its config.json.
"""
from __future__ import annotations

import fcntl
import os
import signal
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import config as C
from ..errors import UsageError
from ..records import RunRecord, read_run
from .checkpoint import load_checkpoint

RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")
EVAL_FILES = ("eval-*.json", "eval-*.csv", "eval-*.md", "eval-*-eps-sweep.png")  # what iat eval writes beside a run


def holds_run(out: Path) -> bool:
    """A folder holds a run if iat wrote any of its files there (a lone metrics.jsonl counts too)."""
    return any((out / name).exists() for name in RUN_FILES)


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


def train(cfg: C.TrainConfig, out: Path, *, saved: Optional[RunRecord] = None, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` into `out`: a new run, the continuation of `saved` (from saved_run), or a replacement."""
    from .trainer import Trainer

    exists = holds_run(out)
    if saved is not None and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pass only one of them")
    if exists and saved is None and not overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if not exists and out.is_dir() and any(not p.name.endswith(".iat-lock") for p in out.iterdir()):
        raise UsageError(f"{out} holds files that are not an iat run; choose a new or empty folder as --out")
    check_writable(out)
    trainer = Trainer(cfg, out)  # every bad input fails here, before anything in `out` changes
    main_rank = trainer.dist.is_main  # under torchrun only rank 0 touches the run directory
    with run_lock(out) if main_rank else nullcontext():
        if holds_run(out) and not exists:  # another process started a run here while we were loading
            raise UsageError(f"{out} already holds a run (started meanwhile by another process); pass --resume to "
                             "continue it or --overwrite to replace it")
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


def lock_path(out: Path) -> Path:
    """Beside the folder or file it guards, so taking the lock creates nothing inside a run directory."""
    return out.parent / f".{out.name}.iat-lock"


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
            raise UsageError(f"{out} is in use by a running iat (pid {holder}); wait for it to finish or choose "
                             f"another {what}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def clear(out: Path) -> None:
    """Remove exactly what an earlier run and its evaluations wrote (--overwrite); nothing else in `out`."""
    for name in RUN_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for pattern in EVAL_FILES:
        for path in out.glob(pattern):
            path.unlink()


def check_writable(out: Path) -> None:
    """Fail before any work: `out` must be, or be creatable in, a folder we can really write to."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create {out}: {probe} is a file, not a folder; choose another --out")
    try:  # a real write, because as root os.access says yes even on a read-only mount
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {probe} ({err.strerror}); choose another --out") from None
