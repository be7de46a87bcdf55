"""speed.layout = "auto": the memory layout that trains fastest here, chosen when a run starts.

NCHW and channels_last (NHWC) compute the same function with different kernels, and which is faster
depends on the processor and the model (on one Xeon, max-pool in NCHW took a third of an iat step and
channels_last made the step 1.39x faster; on an EPYC channels_last was 0.81x). So a new run times a few
of its own training steps (its method, model, optimizer and batch size) in each layout, on copies, in
interleaved rounds whose order alternates (a machine whose load drifts favours neither), and keeps the
faster by the median step time. The global generators are saved and restored around the timing and the
copies are discarded, so the run equals one with the chosen layout set explicitly. A resumed run reuses
the recorded choice. Runs shorter than MIN_RUN_STEPS take nchw untimed (the timing would not pay).
The timing runs without torch.compile, even in a run that compiles.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any, Callable

import torch

from . import distributed, speed
from .device import rng_state, set_rng_state
from .optim import make_optimizer
from .step import StepParts, optimizer_step

EXACT = ("nchw", "channels_last")   # the layouts "auto" chooses between
WARMUP, TIMED = 3, 5                # steps per layout: untimed, then timed
MIN_RUN_STEPS = 20 * len(EXACT) * (WARMUP + TIMED)  # the timing costs at most 5% of a run


def resolve(trainer: Any) -> tuple[str, dict[str, Any]]:
    """(layout, what to record about the choice) for a trainer whose speed.layout is "auto"."""
    if trainer.total_steps < MIN_RUN_STEPS:
        return "nchw", {"choice": "nchw", "timed": False,
                        "reason": f"a run of {trainer.total_steps} steps is too short to time (under {MIN_RUN_STEPS})"}
    saved = rng_state()
    try:
        seconds = time_layouts(trainer)
    finally:
        set_rng_state(saved)
    seconds = distributed.from_main(seconds, trainer.device)  # every rank takes rank 0's choice
    choice = min(EXACT, key=lambda name: seconds[name])
    return choice, {"choice": choice, "timed": True, "seconds_per_step": seconds, "warmup_steps": WARMUP,
                    "timed_steps": TIMED, "statistic": "median of interleaved steps, order alternating"}


def describe(about: dict[str, Any]) -> str:
    """The one line a run prints about its choice."""
    if not about.get("timed"):
        return f"iat: speed.layout auto -> {about['choice']} ({about['reason']})"
    times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in about["seconds_per_step"].items())
    return (f"iat: speed.layout auto -> {about['choice']} (training step, median of {about['timed_steps']} "
            f"interleaved after {about['warmup_steps']} warm-up: {times})")


def time_layouts(trainer: Any) -> dict[str, float]:
    """Median seconds of one training step in each exact layout."""
    steps = {name: _candidate(trainer, name) for name in EXACT}
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    return interleaved_medians(steps, WARMUP, TIMED, sync)


def interleaved_medians(steps: dict[str, Callable[[], Any]], warmup: int, timed: int,
                        sync: Callable[[], None]) -> dict[str, float]:
    """Run every step `warmup` times, then `timed` rounds of one each, the order reversed every round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(timed):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in seconds.items()}


def _candidate(trainer: Any, layout: str) -> Callable[[], Any]:
    """One training step of copies of the trainer's model, method and optimizer in `layout`, on its
    first training images (this rank's share of the batch)."""
    cfg = trainer.cfg
    speed_cfg = dataclasses.replace(cfg.speed, layout=layout)
    model = speed.prepare_model(copy.deepcopy(trainer.model), speed_cfg)
    model.train()
    parts = StepParts(method=copy.deepcopy(trainer.method), model=model, train_model=model,
                      optimizer=make_optimizer(cfg.optim, model), scaler=speed.grad_scaler(trainer.device, cfg.speed.amp),
                      speed=speed_cfg, grad_clip=cfg.optim.grad_clip, device=trainer.device)
    n = cfg.optim.batch_size // trainer.dist.world_size
    x = trainer.train_split.x[:n].to(trainer.device).float().div_(255)
    y = trainer.train_split.y[:n].to(trainer.device)
    parts.method.at_step(0, trainer.total_steps)
    return lambda: optimizer_step(parts, x, y)
