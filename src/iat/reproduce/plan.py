"""What `iat reproduce --dry-run` shows before anything runs: each cell's key settings, the evaluation
phases (the late AutoAttack phase included), and an estimate of the training time from a short timing of
each cell's own training step on this machine."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .. import config as C
from ..errors import UsageError
from ..reporting.render import fmt_eps
from .runner import run_dir, train_state
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
