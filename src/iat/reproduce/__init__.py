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

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from ..config import setting
from ..errors import UsageError
from ..extras import require_matplotlib
from ..training.run_dir import check_writable, run_lock
from ..values import parse_int
from .plan import print_plan
from .render_table import write_table
from .runner import run_table
from .spec import builtin_tables, load_spec


@dataclasses.dataclass
class ReproduceConfig:
    """What `iat reproduce` runs (flags are generated from these)."""

    table: Optional[str] = setting(None, "a built-in table (iat reproduce --list) or a TOML table spec")
    list: bool = setting(False, "list the built-in tables")
    out: Optional[str] = setting(None, "folder of the cells' run directories (default runs/reproduce/TABLE)")
    seeds: Optional[str] = setting(None, "comma-separated seeds instead of the table's")
    jobs: Optional[int] = setting(None, "cells run at once (default 1, or one per --gpus id)")
    gpus: Optional[str] = setting(None, "GPU ids ID,ID,...; each running cell gets one of them alone "
                                  "(CUDA_VISIBLE_DEVICES)")
    threads: Optional[int] = setting(None, "torch threads per cell (default cores / jobs)")
    dry_run: bool = setting(False, "print each cell's settings, the evaluations and the commands that would run, "
                            "and stop")
    estimate: bool = setting(True, "with --dry-run, time a few training steps of each cell on this machine to "
                             "estimate the training time")
    table_only: bool = setting(False, "write the table from the finished cells; run nothing")
    results_md: Optional[str] = setting(None, "also paste the table into this file between its markers (plot "
                                        "beside it in results/)")
    plots: bool = setting(True, "draw curves.png (needs matplotlib)")


def list_tables() -> None:
    """Print the built-in tables: name, cells x seeds and title."""
    tables = builtin_tables()
    width = max(map(len, tables))
    for name, path in tables.items():
        spec = load_spec(str(path))
        print(f"{name:<{width}}  {len(spec.cells)} cells x {len(spec.seeds)} seed(s)  {spec.title}")


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2: distinct integers (a seed given twice would train one cell twice)."""
    try:
        seeds = [parse_int(s, "--seeds") for s in text.split(",")]
    except UsageError:
        raise UsageError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds names a seed twice: {text}")
    return seeds


def reproduce(cfg: ReproduceConfig) -> int:
    """Advance every cell of the table, then write it; 1 if a cell failed (each failure printed)."""
    if cfg.list or not cfg.table:
        list_tables()
        return 0
    spec = load_spec(cfg.table)
    if cfg.seeds:
        spec.seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out or Path("runs") / "reproduce" / spec.name)
    check_writable(out)
    if cfg.threads is not None and cfg.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {cfg.threads}")
    gpus = [g.strip() for g in cfg.gpus.split(",") if g.strip()] if cfg.gpus else None
    jobs = cfg.jobs if cfg.jobs is not None else len(gpus) if gpus else 1
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if gpus and jobs > len(gpus):
        raise UsageError(f"--jobs {jobs} is more than the {len(gpus)} GPUs of --gpus; each cell needs its own GPU")
    if cfg.plots:
        require_matplotlib()
    if cfg.dry_run:
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
        print("\n".join(print_plan(spec, out, jobs, threads, cfg.estimate)), file=sys.stderr)
    if cfg.dry_run or cfg.table_only:
        failures = [] if cfg.table_only else run_table(spec, out, jobs, cfg.threads, True, gpus)
        if cfg.dry_run:
            return 0
    else:  # one runner per table folder; its `iat train` / `iat eval` children lock their own cells' files
        with run_lock(out):
            failures = run_table(spec, out, jobs, cfg.threads, False, gpus)
    command = f"iat reproduce {cfg.table}" + (f" --seeds {cfg.seeds}" if cfg.seeds else "")
    table = write_table(spec, out, Path(cfg.results_md) if cfg.results_md else None, command, cfg.plots)
    print(f"iat reproduce {spec.name}: table in {out / 'table.md'}"
          + ("" if table["complete"] else f" (incomplete: {len(table['missing'])} cells missing)"), file=sys.stderr)
    for c in table["claims"]:
        print(f"  {c['claim']} {c['ours']} vs {c['base']}: {c['verdict']}", file=sys.stderr)
    for line in failures:
        print(f"iat: error: {line}", file=sys.stderr)
    return 1 if failures else 0
