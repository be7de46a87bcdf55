"""What `iat reproduce --dry-run` shows before anything runs: each cell's key settings, the evaluation
phases (the late AutoAttack phase included), and an estimate of the training time from a short timing of
each cell's own training step on this machine; with `--executor slurm`, each cell's job (sbatch parameters and
commands), the number of jobs and the GPU-hours."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .. import config as C
from ..data import load_dataset, train_val_split
from ..errors import UsageError
from ..reporting.render import fmt_eps
from .runner import _plan, plan_steps, run_dir, train_state
from .slurm import Resources, job_name, with_checkpoints
from .spec import TableSpec

TIMED_STEPS = 2  # after one warm-up step


def cell_line(name: str, cfg: C.TrainConfig) -> str:
    """One line of a cell's training settings for the dry-run plan."""
    o, t = cfg.optim, cfg.threat
    options = ", ".join(f"{k}={v}" for k, v in cfg.method_options.items())
    return (f"  {name}: {cfg.method}{f' ({options})' if options else ''}, {cfg.model} on {cfg.data.name} "
            f"(val_size {cfg.data.val_size}), {o.epochs} epochs x batch {o.batch_size}, lr {o.lr:g} {o.schedule}, "
            f"{t.norm} eps {fmt_eps(t.eps)}, {t.steps} steps of {fmt_eps(t.step_size)}")


def eval_lines(spec: TableSpec) -> list[str]:
    """One line per eval group: its attacks, examples, checkpoints and file."""
    kinds = ", ".join(spec.checkpoints)
    return [f"  {'late phase, after every cell has trained' if g.late else 'after each cell trains'}: "
            f"{g.attacks} on {g.n_examples or 'all'} test examples, checkpoints {kinds}"
            f" -> eval-CKPT{'-' + g.name if g.name else ''}.json" for g in spec.evals]


def step_seconds(cfg: C.TrainConfig, threads: int) -> tuple[float, int]:
    """Median seconds of this cell's training step (one warm-up, then TIMED_STEPS) and steps per epoch."""
    from ..training.trainer import Trainer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            eager = {"compile": False} if cfg.speed.compile == "auto" else {}  # "auto" would wait for fit() to time
            trainer = Trainer(C.update(C.from_dict(C.to_dict(cfg)), {"speed": {"layout": "nchw", **eager}}),
                              Path(tmp) / "run")
            batches = trainer.loader.batches(0)
            times = []
            for _ in range(TIMED_STEPS + 1):
                x, y = next(batches)
                t0 = time.perf_counter()
                trainer.train_step(x, y)
                times.append(time.perf_counter() - t0)
            return sorted(times[1:])[len(times[1:]) // 2], len(trainer.loader)
    finally:
        torch.set_num_threads(before)


def estimate_lines(spec: TableSpec, out: Path, jobs: int, threads: int) -> list[str]:
    """Training time of the cells still to train, from each cell's timed step, spread over `jobs`."""
    total, lines = 0.0, []
    for cell in spec.cells:
        cfg = spec.train_config(cell, spec.seeds[0])
        todo = [s for s in spec.seeds if train_state(run_dir(out, cell, s), spec.train_config(cell, s)) != "done"]
        if not todo:
            continue
        try:
            seconds, steps = step_seconds(cfg, threads)
        except UsageError as err:  # e.g. the data set is not on this machine
            return [f"  no estimate: {err}"]
        cell_total = seconds * steps * cfg.optim.epochs * len(todo)
        total += cell_total
        lines.append(f"  {cell.name}: {1000 * seconds:.0f} ms/step x {steps} steps x {cfg.optim.epochs} epochs x "
                     f"{len(todo)} seed(s) = {cell_total / 60:.1f} min")
    lines.append(f"  training in all: about {total / jobs / 60:.0f} min with {jobs} job(s) of {threads} thread(s) "
                 "(validation and evaluations come on top; AutoAttack costs the most)")
    return lines


def print_plan(spec: TableSpec, out: Path, jobs: int, threads: int, estimate: bool) -> list[str]:
    """The dry-run plan's lines: cells, evaluations and (with `estimate`) the time it will take."""
    lines = [f"iat reproduce {spec.name}: {len(spec.cells)} cells x {len(spec.seeds)} seeds {spec.seeds} into {out}"]
    lines += [cell_line(c.name, spec.train_config(c, spec.seeds[0])) for c in spec.cells]
    lines += ["evaluations:", *eval_lines(spec)]
    if estimate:
        lines += [f"estimated from {TIMED_STEPS} timed training steps per cell on this machine:",
                  *estimate_lines(spec, out, jobs, threads)]
    return lines


def slurm_plan(spec: TableSpec, out: Path, res: Resources, minutes: float, images_per_second: Optional[float],
               estimate: bool, threads: int) -> list[str]:
    """--dry-run --executor slurm: each cell's job (its sbatch parameters and commands), the number of jobs and
    the GPU-hours of the training still to run. Submits nothing, needs no SLURM."""
    early = {ident: steps for ident, _, _, _, steps in _plan(spec, out, False, notes=False)}
    lines, n_late = [f"executor slurm: one job per cell, submitted with submitit (its files and the ledger in "
                     f"{out / 'slurm'}); a job runs its cell's training, then its early evaluations:"], 0
    for cell in spec.cells:
        for seed in spec.seeds:
            ident = f"{cell.name}/seed{seed}"
            late = plan_steps(spec, out, cell, seed, "done", True, notes=False)  # what it will need once trained
            if ident not in early and not late:
                lines.append(f"  {ident}: done")
                continue
            lines.append(f"  {ident}: sbatch {' '.join(res.sbatch_flags(job_name(spec, ident)))}")
            lines += [f"    {s.command()}" for s in with_checkpoints(early.get(ident, []), minutes)]
            if res.world > 1 and ident in early:
                lines.append(f"    (DDP: each of the job's {res.world} tasks runs the training, its rank from SLURM; "
                             "the evaluations run on task 0)")
            if late:
                n_late += 1
                single = "" if res.world == 1 else f" (one process: {' '.join(res.single().sbatch_flags('')[1:])})"
                lines += [f"    its late-phase job{single}:", *(f"    {s.command()}" for s in late)]
    lines.append(f"jobs: {len(early)} now, {n_late} of the late phase (AutoAttack) later; those are not dependent "
                 "jobs: the first run of this command after every cell has trained submits them")
    return lines + gpu_hours(spec, out, res, images_per_second, estimate, threads)


def gpu_hours(spec: TableSpec, out: Path, res: Resources, images_per_second: Optional[float], estimate: bool,
              threads: int) -> list[str]:
    """The training still to run, in GPU-hours: training images x epochs x seeds left / images per second
    (--images-per-second, else timed here as --estimate does); validation and evaluations come on top."""
    if not images_per_second and not estimate:
        return ["GPU-hours: unknown (give --images-per-second N, or leave --estimate on to time a few steps here)"]
    source = ("--images-per-second" if images_per_second else
              f"timed on this machine, {TIMED_STEPS} steps per cell with {threads} thread(s), not on the cluster's")
    gpus = res.gpus * res.nodes
    lines, total = [f"GPU-hours of the training still to run at {gpus} GPU(s) per job (images/s {source}):"], 0.0
    for cell in spec.cells:
        todo = [s for s in spec.seeds if train_state(run_dir(out, cell, s), spec.train_config(cell, s)) != "done"]
        if not todo:
            continue
        cfg = spec.train_config(cell, spec.seeds[0])
        try:
            images, rate = train_rate(cfg, images_per_second, threads)
        except UsageError as err:  # e.g. the data set is not on this machine
            return lines + [f"  unknown: {err}"]
        hours = images * cfg.optim.epochs * len(todo) / rate / 3600
        total += hours
        lines.append(f"  {cell.name}: {images} images x {cfg.optim.epochs} epochs x {len(todo)} seed(s) at "
                     f"{rate:.0f} images/s = {hours:.2f} h")
    lines.append(f"  in all: {total:.2f} h of jobs = {total * gpus:.2f} GPU-hours (validation and evaluations "
                 "come on top; AutoAttack costs the most)")
    return lines


def train_rate(cfg: C.TrainConfig, images_per_second: Optional[float], threads: int) -> tuple[int, float]:
    """Training images per epoch and images per second of one cell: the given rate, else its timed step."""
    if images_per_second:
        train = train_val_split(load_dataset(cfg.data.name, cfg.data.root).train, cfg.data.val_size, cfg.seed)[0]
        return len(train), images_per_second
    seconds, steps = step_seconds(cfg, threads)
    return steps * cfg.optim.batch_size, cfg.optim.batch_size / seconds
