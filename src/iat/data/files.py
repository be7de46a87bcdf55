"""File plumbing shared by the loaders: checksums with a verified-marker, atomic writes, downloads, safe tar.

Every failure a user can fix (bad checksum, truncated archive, unreachable URL, unsafe archive member)
becomes a one-line UsageError that names the file and says what to do.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ..errors import UsageError
from ..records import atomic_write_bytes

MARKER = ".verified.json"


def log(message: str) -> None:
    """Progress for the person waiting; stderr so that stdout stays clean for results."""
    print(f"[iat.data] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where extracted archives and decoded arrays go: $IAT_CACHE_DIR, else ~/.cache/iat."""
    env = os.environ.get("IAT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iat"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (cache keys), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's md5 hex digest, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gunzip_md5(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a gzip file's content; 'unreadable' if the gzip stream is broken."""
    h = hashlib.md5()
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except (OSError, EOFError, zlib.error):
        return "unreadable"
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`, renamed onto it only if the block succeeds.

    An interrupted download or write thus never leaves a half file under the real name; the file is
    fsynced before the rename, as records.atomic_write_bytes does for whole-buffer writes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_marked(path: Path, expected: str) -> bool:
    """True if `path` was verified against `expected` and has not changed (size and mtime) since."""
    entry = _read_marker(path.parent).get(path.name)
    return isinstance(entry, dict) and entry == {"md5": expected, **_stamp(path)}


def mark_verified(path: Path, expected: str) -> None:
    """Record that `path` matched `expected` (with its size and mtime), so it is not rehashed."""
    marker = _read_marker(path.parent)
    marker[path.name] = {"md5": expected, **_stamp(path)}
    # A read-only data folder only costs a rehash next time, so a failed write is not an error.
    with contextlib.suppress(OSError):
        atomic_write_bytes(path.parent / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode())


GZIP_MAGIC = b"\x1f\x8b"
FETCH_AGAIN = "fetch it again or put a good copy in its place (README.md, section Data)"


def damage(path: Path) -> str | None:
    """What is plainly wrong with a data file, from its size and first bytes: 'is empty (0 bytes)' or
    'is not a gzip file' (for a .gz/.tgz name); None when neither (a digest or a reader must tell)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(GZIP_MAGIC))
    except OSError:
        return None
    if size == 0:
        return "is empty (0 bytes)"
    if path.name.lower().endswith((".gz", ".tgz")) and head != GZIP_MAGIC:
        return "is not a gzip file"
    return None


def one_line(err: BaseException) -> str:
    """An exception's message fit for a one-line error: tarfile's 'r:*' lists every method it tried,
    one per line, which says no more than 'no tar format reads it'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1:
        return "no tar format (plain, gzip, bzip2, xz) can read it"
    return lines[0] if lines else type(err).__name__


def check_md5(path: Path, expected: str | None, hint: str, digest: Callable[[Path], str] = md5_file) -> None:
    """Raise UsageError unless digest(path) == expected; unchanged files verified before are not rehashed.

    `expected=None` skips the check (tests use it for generated files). `hint` says how to get a good copy.
    """
    if expected is None or is_marked(path, expected):
        return
    actual = digest(path)
    if actual != expected:
        problem = damage(path)
        if problem is not None:
            raise UsageError(f"{path} {problem}; delete it and fetch it again ({hint})")
        raise UsageError(
            f"{path}: md5 is {actual}, expected {expected}; the file is damaged or not the official one, "
            f"delete it and fetch again ({hint})"
        )
    mark_verified(path, expected)


def download(url: str, dest: Path, md5: str | None, timeout: float = 30.0) -> None:
    """Stream `url` to `dest` atomically, checking its md5 on the fly; UsageError if unreachable or wrong."""
    log(f"downloading {url}")
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.25
            with open(tmp, "wb") as f:
                while block := resp.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if total and done / total >= next_report:
                        log(f"  {done / total:.0%} of {total / 1e6:.1f} MB")
                        next_report += 0.25
            if md5 is not None and h.hexdigest() != md5:
                raise UsageError(
                    f"download of {url} has md5 {h.hexdigest()}, expected {md5}; the server sent a different "
                    "file, try again later or fetch it by hand"
                )
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        reason = getattr(e, "reason", e)
        raise UsageError(f"could not download {url}: {reason}") from e
    if md5 is not None:
        mark_verified(dest, md5)


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could write outside the target folder or are not plain files and folders."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\") or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        raise UsageError(f"refusing archive {archive}: member {name!r} points outside the extraction folder")
    if not (member.isfile() or member.isdir()):
        raise UsageError(f"refusing archive {archive}: member {name!r} is a link or device, not a plain file")


@contextlib.contextmanager
def reading_archive(archive: Path) -> Iterator[None]:
    """Turn the many ways a damaged tar.gz fails into one UsageError that names it."""
    try:
        yield
    except UsageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        if type(e).__name__.endswith("FilterError"):
            raise UsageError(f"refusing archive {archive}: {one_line(e)}") from e
        problem = damage(archive)
        if problem is not None:
            raise UsageError(f"archive {archive} {problem}; {FETCH_AGAIN}") from e
        raise UsageError(f"archive {archive} is truncated or corrupt ({one_line(e)}); {FETCH_AGAIN}") from e


def iter_tar(archive: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream an archive's members in one pass, refusing unsafe ones; wrap the loop in reading_archive."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            check_member(member, archive)
            yield member, tar


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    """The bytes of a plain-file member (a folder by the name of a wanted file is refused)."""
    f = tar.extractfile(member)
    if f is None:
        raise UsageError(f"refusing archive {archive}: member {member.name!r} is not a plain file")
    return f.read()


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest`, which appears only once complete; refuses unsafe members."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"cannot extract into {tmp.parent} ({e}); choose a writable folder") from e
    log(f"extracting {archive} into {dest}")
    try:
        with reading_archive(archive), tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member, archive)
            if hasattr(tarfile, "data_filter"):  # filter="data" (Python >= 3.11.4): a second guard behind our check
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons
                tar.extractall(tmp, members=members)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
