"""The one error type for bad input from the user, and the one reading of operating-system errors.

The command line prints a UsageError's message on one line and exits with status 2 (a traceback only
with --debug); library callers catch it like any ValueError. An OSError that escapes a command goes through
`os_error_line`: errors that a path the user chose causes (a file where a folder must be, a name too long,
a file that may not be changed, a full disk, ...) name the path and what to do, with status 2 as for other
bad input; others (an I/O error of the device) are reported on one line with status 1.
"""
from __future__ import annotations

import errno


class UsageError(ValueError):
    """Bad input from the user: a wrong name or value, a missing or damaged file, a mismatched model."""


# errno -> (what is wrong with the path, what to do). One table for every command (cli.main).
OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose a path whose folders are folders"),
    errno.EISDIR: ("a folder where a file is expected", "give a file's path"),
    errno.ENOENT: ("no such file or folder", "check the path, or create its folder first"),
    errno.EEXIST: ("it already exists", "choose another path or remove it"),
    errno.ENAMETOOLONG: ("a name longer than the file system allows (255 bytes per name on most)",
                         "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop?)", "fix the link or choose another path"),
    errno.EACCES: ("this user may not read or write it", "fix its permissions or choose another path"),
    errno.EPERM: ("it may not be changed (an immutable or append-only file, or a folder that forbids it)",
                  "check `lsattr` / permissions, or choose another path"),
    errno.EROFS: ("a read-only file system", "choose a path on a writable disk"),
    errno.ENOSPC: ("no space left on its disk", "free some space or choose another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or choose another disk"),
    errno.EXDEV: ("on another file system than the file it should replace", "keep both on one disk"),
    errno.ENOTEMPTY: ("a folder that is not empty", "choose an empty or new folder"),
    errno.EMFILE: ("this process has too many open files",
                   "raise the limit (ulimit -n) or use fewer data-loader workers"),
}


def os_error_line(err: OSError) -> tuple[str, int]:
    """The one-line message and exit status for an OSError that ended a command: 2 (with the path and what to
    do) for the errors of `OS_ERRORS`, 1 for the others (the operating system's own message)."""
    path = err.filename
    if err.filename2 is not None:
        path = f"{err.filename} -> {err.filename2}"
    known = OS_ERRORS.get(err.errno) if err.errno is not None else None
    if known is None:
        return (f"{err}" if path is None or str(path) in str(err) else f"{path}: {err}"), 1
    what, todo = known
    where = "a path" if path is None else str(path)
    return f"{where}: {what} ({err.strerror or errno.errorcode.get(err.errno or 0, '?')}); {todo}", 2
