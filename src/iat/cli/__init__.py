"""Command line: `iat train`, `iat eval`, `iat report`, `iat reproduce`, `iat list`, `iat data fetch`.

Argument parsing only: each subcommand's flags are generated from its config dataclass (cli.flags) and its
handler calls the library (cli.commands). Bad input ends with a one-line message on stderr and exit status
2 (a traceback only with --debug). So does an operating-system error that a path the user chose causes (a
file where a folder must be, a name too long, an immutable file, a full disk: `errors.os_error_line` names
the path and what to do); other operating-system failures (an I/O error) end with one line and status 1.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from ..errors import UsageError, os_error_line
from .commands import COMMANDS, INTERRUPTED


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), exit status 2, like every other."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print the usage error on one line and exit with status 2."""
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The `iat` parser with one sub-command per entry of COMMANDS."""
    parser = Parser(prog="iat", description="Inverse adversarial training and robust evaluation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for make_parser, _ in COMMANDS.values():
        make_parser(sub)
    return parser


def _show_warning(message: Any, *_: Any, **__: Any) -> None:
    print(f"iat: warning: {message}", file=sys.stderr)  # one line, without the source line Python adds


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `iat ARGV` (sys.argv without one); returns the exit status (2: usage error)."""
    args = build_parser().parse_args(argv)
    previous = _on_sigterm_interrupt()
    try:
        with warnings.catch_warnings():  # restores the global hook when main returns (tests call main())
            warnings.showwarning = _show_warning
            return COMMANDS[args.command][1](args)
    except UsageError as err:
        if args.debug:
            raise
        rank, local = _launch_place()
        if rank == 0:  # under torchrun or srun every rank meets the same bad input: rank 0 says it
            print(f"iat: error: {err}", file=sys.stderr)
        elif local == 0:  # ... and the first rank of every other node, whose own files (its data) may differ
            print(f"iat: error (rank {rank}, {socket.gethostname()}): {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        message, status = os_error_line(err)  # the path and what to do, status 2; an I/O fault: status 1
        rank = _launch_rank()
        if rank == 0 or status == 1:  # a device fault may be one rank's own: each rank names itself
            print(f"iat: error: {message}" if rank == 0 else f"iat: error (rank {rank}): {message}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"iat: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _launch_rank() -> int:
    return _launch_place()[0]


def _launch_place() -> tuple[int, int]:
    """(rank, rank on its node) as torchrun or srun set them; (0, 0) for a single process."""
    from ..runtime.distributed import launch_local_rank, launch_rank  # torch: imported only for an error

    return launch_rank(), launch_local_rank()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt() -> Any:
    """SIGTERM (a scheduler's stop) ends like Ctrl-C: one line saying what was kept. Main thread only."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


if __name__ == "__main__":
    sys.exit(main())
