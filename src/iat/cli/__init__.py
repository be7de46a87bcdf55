"""Command line: `iat train`, `iat eval`, `iat report`, `iat reproduce`, `iat list`, `iat data fetch`.

Argument parsing only: each subcommand's flags are generated from its config dataclass (cli.flags) and its
handler calls the library (cli.commands). Bad input ends with a one-line message on stderr and exit status
2 (a traceback only with --debug); an operating-system failure (disk full, permissions) with a one-line
message and status 1.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Any, Optional, Sequence

from ..errors import UsageError
from .commands import COMMANDS, INTERRUPTED


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), exit status 2, like every other."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iat", description="Inverse adversarial training and robust evaluation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for make_parser, _ in COMMANDS.values():
        make_parser(sub)
    return parser


def _show_warning(message: Any, *_: Any, **__: Any) -> None:
    print(f"iat: warning: {message}", file=sys.stderr)  # one line, without the source line Python adds


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _on_sigterm_interrupt()
    try:
        with warnings.catch_warnings():  # restores the global hook when main returns (tests call main())
            warnings.showwarning = _show_warning
            return COMMANDS[args.command][1](args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"iat: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        print(f"iat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"iat: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
