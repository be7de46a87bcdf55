"""`iat reproduce TABLE`: train and evaluate every cell (method x seed) of an experiment table, then write it.

A table is a TOML spec (built-in ones live in iat/experiments/, `iat reproduce --list` names them; a path to
your own file works the same). Every cell is an ordinary run directory OUT/<cell>/seed<k> made by the
`iat train` and `iat eval` commands the runner prints and runs as subprocesses, so a user can inspect,
evaluate or report any cell by hand. Running the same command again continues where it stopped: finished
cells are skipped, an interrupted training run is resumed from its last checkpoint, and only missing
evaluations are computed. A cell whose saved settings differ from the spec is never overwritten: the
runner stops and names the first differing setting.

The table (table.md/.csv/.json, curves.png) gives each cell's mean and spread over seeds for the best and
the last checkpoint, wall time per epoch, catastrophic-overfitting flags, and each claim's paired
comparison, all read from the run directories; `--results-md FILE` also pastes it into FILE between
markers, so documentation never holds a number typed by hand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from .runner import run_table
from .spec import builtin_tables, load_spec
from .table import write_table


def run_reproduce(args: argparse.Namespace) -> int:
    if args.list or not args.table:
        tables = builtin_tables()
        width = max(map(len, tables))
        for name, path in tables.items():
            spec = load_spec(str(path))
            print(f"{name:<{width}}  {len(spec.cells)} cells x {len(spec.seeds)} seed(s)  {spec.title}")
        return 0
    spec = load_spec(args.table)
    if args.seeds:
        spec.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or Path("runs") / "reproduce" / spec.name)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    jobs = args.jobs if args.jobs is not None else len(gpus) if gpus else 1
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if gpus and jobs > len(gpus):
        raise UsageError(f"--jobs {jobs} is more than the {len(gpus)} GPUs of --gpus; each cell needs its own GPU")
    if not args.no_plots:
        from ..reporting.plots import require_matplotlib

        require_matplotlib()
    failures = [] if args.table_only else run_table(spec, out, jobs, args.threads, args.dry_run, gpus)
    if args.dry_run:
        return 0
    command = f"iat reproduce {args.table}" + (f" --seeds {args.seeds}" if args.seeds else "")
    table = write_table(spec, out, Path(args.results_md) if args.results_md else None, command, not args.no_plots)
    print(f"iat reproduce {spec.name}: table in {out / 'table.md'}"
          + ("" if table["complete"] else f" (incomplete: {len(table['missing'])} cells missing)"), file=sys.stderr)
    for c in table["claims"]:
        print(f"  {c['claim']} {c['ours']} vs {c['base']}: {c['verdict']}", file=sys.stderr)
    for line in failures:
        print(f"iat: error: {line}", file=sys.stderr)
    return 1 if failures else 0
