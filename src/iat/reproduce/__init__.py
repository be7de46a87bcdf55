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

With `--executor slurm` every cell is a SLURM job of its own instead (reproduce/slurm.py): the command submits
them and returns; run it again to see each cell's state and to submit what is left (the late phase included),
or pass --wait.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from ..config import read_config_file, setting, update
from ..errors import UsageError
from ..extras import require_matplotlib
from ..training.run_dir import check_writable, run_lock
from ..values import check_range, parse_int
from .plan import print_plan, slurm_plan
from .render_table import write_table
from .runner import run_table
from .slurm import MAX_TIMEOUTS, Resources, live_jobs, parse_extra, run_slurm
from .spec import TableSpec, builtin_tables, load_spec

EXECUTORS = ("local", "slurm")
RESOURCES = ("partition", "gpus_per_cell", "nodes_per_cell", "tasks_per_node", "cpus_per_cell", "mem_gb", "time_min",
             "account", "sbatch_extra", "checkpoint_minutes")  # what a --slurm-config file may set
SLURM_ONLY = ("wait", *RESOURCES, "images_per_second")  # flags of --executor slurm alone


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
    executor: str = setting("local", "where the cells run: local (subprocesses here) or slurm (one SLURM job per "
                            "cell, submitted with submitit; run the command again to see their states)",
                            choices=EXECUTORS)
    wait: bool = setting(False, "slurm: wait until the jobs end (polling squeue), submit the late phase, wait again, "
                         "then write the table")
    partition: Optional[str] = setting(None, "slurm: the partition of the cells' jobs (default: the cluster's)")
    gpus_per_cell: Optional[int] = setting(None, "slurm: GPUs on each node of a cell's job (default 1, or 0 when "
                                           "every cell trains on device cpu); more than one: its training is DDP, "
                                           "one process per GPU, started by srun", bounds="[0, 1024]")
    nodes_per_cell: int = setting(1, "slurm: nodes of each cell's job; more than one: its training is DDP across "
                                  "them (evaluations run on the first node)", bounds="[1, 4096]")
    tasks_per_node: Optional[int] = setting(None, "slurm: training processes on each node of a cell's job (default: "
                                            "one per GPU, or 1); more than one in all: DDP", bounds="[1, 1024]")
    cpus_per_cell: int = setting(4, "slurm: CPUs on each node of a cell's job, shared by its training processes "
                                 "(their torch threads unless --threads)", bounds="[1, 4096]")
    mem_gb: Optional[float] = setting(None, "slurm: memory on each node of a cell's job in GB (default: the "
                                      "cluster's)", bounds="(0, inf)")
    time_min: int = setting(720, "slurm: time limit of each job in minutes; a job warned of it is requeued (up to "
                            f"{MAX_TIMEOUTS} times) and resumes from its last checkpoint", bounds="[1, 1e7]")
    account: Optional[str] = setting(None, "slurm: the account the jobs are charged to (default: yours)")
    sbatch_extra: Optional[str] = setting(None, "slurm: more sbatch parameters, KEY=VALUE,... (e.g. qos=high,"
                                          "constraint=a100; a KEY alone is a flag)")
    checkpoint_minutes: float = setting(5.0, "slurm: a cell's training also saves its state every N minutes "
                                        "(iat train --checkpoint-every-minutes), so a preempted job loses at most "
                                        "that; 0: only at the end of each epoch", bounds="[0, 1e6]")
    images_per_second: Optional[float] = setting(None, "slurm --dry-run: training images per second of one "
                                                 "cell's job, for the GPU-hours estimate (default: --estimate's "
                                                 "timing on this machine)", bounds="(0, inf)")



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
    check_executor(cfg)
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
    if cfg.executor == "slurm" and not cfg.table_only:
        return _reproduce_slurm(cfg, spec, out)
    if cfg.dry_run:
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
        print("\n".join(print_plan(spec, out, jobs, threads, cfg.estimate)), file=sys.stderr)
    if cfg.dry_run or cfg.table_only:
        failures = [] if cfg.table_only else run_table(spec, out, jobs, cfg.threads, True, gpus)
        if cfg.dry_run:
            return 0
    else:  # one runner per table folder; its `iat train` / `iat eval` children lock their own cells' files
        live = live_jobs(out)
        if live:
            raise UsageError(f"{len(live)} SLURM job(s) of this table are queued or running ({', '.join(live)}; "
                             "--executor slurm shows them): let them end, or scancel them, before running it here")
        with run_lock(out):
            failures = run_table(spec, out, jobs, cfg.threads, False, gpus)
    return _write(cfg, spec, out, failures)


def check_executor(cfg: ReproduceConfig) -> None:
    """--executor and the flags that belong to one of them."""
    if cfg.executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    for f in dataclasses.fields(cfg):
        if f.metadata.get("bounds"):
            check_range(getattr(cfg, f.name), f.metadata["bounds"], "--" + f.name.replace("_", "-"))
    defaults = ReproduceConfig()
    slurm_only = [f for f in SLURM_ONLY if getattr(cfg, f) != getattr(defaults, f)]
    if cfg.executor == "local" and slurm_only:
        raise UsageError(f"--{slurm_only[0].replace('_', '-')} is for --executor slurm")
    if cfg.executor == "slurm" and (cfg.jobs is not None or cfg.gpus):
        raise UsageError("--jobs and --gpus are for --executor local; with slurm every cell is a job of its own "
                         "(its GPUs: --gpus-per-cell)")


def slurm_resources(cfg: ReproduceConfig, spec: TableSpec) -> Resources:
    """What each cell's job asks for, from the flags (no GPU by default when every cell trains on the CPU)."""
    on_cpu = all(spec.train_config(c, spec.seeds[0]).device == "cpu" for c in spec.cells)
    gpus = cfg.gpus_per_cell if cfg.gpus_per_cell is not None else 0 if on_cpu else 1
    res = Resources(cfg.partition, gpus, cfg.cpus_per_cell, cfg.mem_gb, cfg.time_min, cfg.account,
                    parse_extra(cfg.sbatch_extra), cfg.nodes_per_cell, cfg.tasks_per_node)
    res.check()
    return res


def read_slurm_config(path: str, cfg: ReproduceConfig) -> ReproduceConfig:
    """--slurm-config FILE: the resources of the cells' jobs from a TOML or JSON file whose keys are the flags'
    (partition = "gpu", gpus_per_cell = 4, sbatch_extra = {qos = "high"}, ...); the flags typed still win, as
    they are applied after it."""
    values = read_config_file(path)
    for key in values:
        if key not in RESOURCES:
            raise UsageError(f"--slurm-config {path}: unknown key {key!r}; it may set {', '.join(RESOURCES)}")
    extra = values.get("sbatch_extra")
    if isinstance(extra, dict):  # a table of sbatch parameters, a value true for a flag alone
        values["sbatch_extra"] = ",".join(k if v is True else f"{k}={v}" for k, v in extra.items())
    return update(cfg, values)


def _reproduce_slurm(cfg: ReproduceConfig, spec: TableSpec, out: Path) -> int:
    """--executor slurm: the plan (--dry-run), or one round of submissions (with --wait: until every job ended)."""
    res, out = slurm_resources(cfg, spec), out.resolve()  # the folder as the jobs see it
    threads = cfg.threads or res.threads
    if cfg.dry_run:
        lines = print_plan(spec, out, 1, threads, False)
        lines += slurm_plan(spec, out, res, cfg.checkpoint_minutes, cfg.images_per_second, cfg.estimate, threads)
        print("\n".join(lines), file=sys.stderr)
        return 0
    failures, finished = run_slurm(spec, out, res, threads, cfg.checkpoint_minutes, cfg.wait)
    return _write(cfg, spec, out, failures) if finished else 0


def _write(cfg: ReproduceConfig, spec: TableSpec, out: Path, failures: list[str]) -> int:
    """Write the table, print its claims and the failures; 1 if a cell failed."""
    command = f"iat reproduce {cfg.table}" + (f" --seeds {cfg.seeds}" if cfg.seeds else "")
    table = write_table(spec, out, Path(cfg.results_md) if cfg.results_md else None, command, cfg.plots)
    print(f"iat reproduce {spec.name}: table in {out / 'table.md'}"
          + ("" if table["complete"] else f" (incomplete: {len(table['missing'])} cells missing)"), file=sys.stderr)
    for c in table["claims"]:
        print(f"  {c['claim']} {c['ours']} vs {c['base']}: {c['verdict']}", file=sys.stderr)
    for line in failures:
        print(f"iat: error: {line}", file=sys.stderr)
    return 1 if failures else 0
