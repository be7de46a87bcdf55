"""speed.layout = "auto" and speed.compile = "auto" (the defaults): the exact choice that trains fastest here,
chosen when a run starts.

NCHW and channels_last (NHWC) compute the same function with different kernels, and torch.compile fuses the
same operations into other kernels; which is faster depends on the processor and the model (on one Xeon,
max-pool in NCHW took a third of an iat step and channels_last made the step 1.39x faster; on an EPYC
channels_last was 0.81x). So a new run times a few of its own training steps (its method, model, optimizer
and batch size) in each candidate, on copies, in interleaved rounds whose order alternates (a machine whose
load drifts favours none), and keeps the fastest by the median step time.

The candidates are every layout the config allows (both for "auto", else the one set) in every compile
setting it allows. compile "auto" adds the compiled candidates (each layout under torch.compile) on CUDA
only: on a CPU it resolves to false untimed, since inductor compiles for minutes there and rarely wins.
The eager candidates are timed first; the compiled ones join them only if the run would train for
MIN_COMPILE_RUN_SECONDS at the fastest eager step. A compiled candidate warms up for COMPILE_WARMUP steps
(compilation, and the recompiles that the attacks' requires_grad flips cause, happen there), and those
seconds are recorded: with compile "auto" a compiled candidate is kept only if its saving over the rest of
the run (median saving per step times the steps left) exceeds them, because the run's own model compiles
again. A compiled candidate that raises (TorchDynamo, inductor, a missing compiler) is dropped and its
error recorded; the run goes on without compile. torch._dynamo.reset() then clears the copies' compiled
code, so the run's model compiles fresh (and does not meet dynamo's recompile limit).

The global generators are saved and restored around the timing and the copies are discarded, so the run
equals one with the chosen settings set explicitly. A resumed run reuses the recorded choice (from_record).
Runs shorter than MIN_RUN_STEPS take nchw and no compile untimed (the timing would not pay), as does a
config that leaves only one candidate.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional, Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..data import Split
from ..errors import UsageError
from ..methods import Method
from ..runtime import distributed
from ..runtime.device import rng_state, set_rng_state
from ..runtime.distributed import DistInfo
from . import speed
from .optim import make_optimizer
from .progress import Progress
from .step import StepParts, optimizer_step

EXACT = ("nchw", "channels_last")   # the layouts "auto" chooses between
WARMUP, TIMED = 3, 5                # steps per candidate: untimed, then timed
COMPILE_WARMUP = 10                 # untimed steps of a compiled candidate (compiling and recompiling)
MIN_RUN_STEPS = 20 * len(EXACT) * (WARMUP + TIMED)  # the timing costs at most 5% of a run
MIN_COMPILE_RUN_SECONDS = 1800      # compiled candidates only for runs this long (at the fastest eager step):
                                    # compiling one takes a minute or two, so timing two costs under ~10%
COMPILED = "+compile"               # the suffix of a compiled candidate's name: "channels_last+compile"
clock = time.perf_counter           # the timer (tests put in a fake one, so a choice is deterministic)
CPU_COMPILE = ("compile auto is false untimed on {device}: inductor compiles for minutes on a CPU and rarely "
               "wins there")


class Host(Protocol):
    """What the layout choice reads of the trainer that asks for it (`Trainer` is one)."""

    cfg: TrainConfig
    device: torch.device
    dist: DistInfo
    method: Method
    model: nn.Module
    progress: Progress
    total_steps: int
    train_split: Split


def compile_is_timed(device: torch.device) -> bool:
    """Whether compile "auto" times compiled candidates on `device` (CUDA only; tests switch it on)."""
    return device.type == "cuda"


def candidates(speed_cfg: Any, device: torch.device) -> tuple[list[str], Optional[str]]:
    """The candidates' names, in order of preference when nothing is timed, and why compile "auto" adds no
    compiled ones here (None when it does, or when compile is set)."""
    layouts = EXACT if speed_cfg.layout == "auto" else (speed_cfg.layout,)
    compiles, why = [speed_cfg.compile], None
    if speed_cfg.compile == "auto":
        compiles = [False, True] if compile_is_timed(device) else [False]
        why = None if compile_is_timed(device) else CPU_COMPILE.format(device=device.type)
    return [name + (COMPILED if c else "") for c in compiles for name in layouts], why


def parts(name: str) -> tuple[str, bool]:
    """'channels_last+compile' -> ('channels_last', True)."""
    return name.removesuffix(COMPILED), name.endswith(COMPILED)


def resolve(trainer: Host) -> tuple[str, bool, dict[str, Any]]:
    """(layout, compile, what to record about the choice) for a trainer whose speed.layout or speed.compile
    is "auto"."""
    sp = trainer.cfg.speed
    names, why = candidates(sp, trainer.device)
    about: dict[str, Any] = {"auto": [k for k in ("layout", "compile") if getattr(sp, k) == "auto"]}
    if why:
        about["compile_reason"] = why
    if trainer.total_steps < MIN_RUN_STEPS or len(names) == 1:
        short = trainer.total_steps < MIN_RUN_STEPS
        about.update(timed=False, reason=f"a run of {trainer.total_steps} steps is too short to time (under "
                     f"{MIN_RUN_STEPS})" if short else "one candidate, nothing to time")
        return _chosen(names[0], about)
    saved = rng_state()
    try:
        names, timing = _time(trainer, names, about)
    finally:
        set_rng_state(saved)
    about.update(timed=True, **_agreed(timing, names, trainer.device), warmup_steps=WARMUP,
                 compile_warmup_steps=COMPILE_WARMUP, timed_steps=TIMED, run_steps=_steps_left(trainer),
                 statistic="median of interleaved steps, order alternating")
    if not about["seconds_per_step"]:
        raise UsageError(f"speed.compile = true failed in every layout while timing: {about['dropped']}; set "
                         "speed.compile=false or auto")
    return _chosen(choose(about, sp.compile == "auto"), about)


def _time(trainer: Host, names: list[str], about: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(the names timed, their timing). With compile "auto", the eager candidates are timed first, and the
    compiled ones join them (all timed again, interleaved) only if the run, at the fastest eager step, would
    train for MIN_COMPILE_RUN_SECONDS: a shorter one could not pay for compiling."""
    eager = [n for n in names if not parts(n)[1]]
    if trainer.cfg.speed.compile != "auto" or len(eager) == len(names):
        return names, time_candidates(trainer, names)
    first = time_candidates(trainer, eager)
    run_s = min(first["seconds_per_step"].values()) * _steps_left(trainer)
    run_s = distributed.from_main({"run_s": run_s}, trainer.device)["run_s"]  # every rank decides alike
    if run_s >= MIN_COMPILE_RUN_SECONDS:
        return names, time_candidates(trainer, names)
    about["compile_reason"] = (f"compile auto is false, compiled candidates untimed: the run would train for about "
                               f"{run_s:.0f} s, too short to pay for compiling (under {MIN_COMPILE_RUN_SECONDS} s)")
    return eager, first


def _chosen(name: str, about: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    layout, compiled = parts(name)
    about.update(choice=name, layout=layout, compile=compiled)
    return layout, compiled, about


def _steps_left(trainer: Host) -> int:
    return trainer.total_steps - trainer.progress.global_step


def _agreed(timing: dict[str, Any], names: list[str], device: torch.device) -> dict[str, Any]:
    """Rank 0's timings on every rank (every rank takes its choice); a candidate dropped there is dropped
    everywhere."""
    seconds = distributed.from_main({n: timing["seconds_per_step"].get(n, math.inf) for n in names}, device)
    warm = {n: timing["compile_warmup_seconds"].get(n, 0.0) for n in names if parts(n)[1]}
    warm = distributed.from_main(warm, device) if warm else warm
    kept = {n: s for n, s in seconds.items() if math.isfinite(s)}
    return {"seconds_per_step": kept, "compile_warmup_seconds": {n: w for n, w in warm.items() if n in kept},
            "dropped": {n: timing["dropped"].get(n, "failed on rank 0") for n in names if n not in kept}}


def choose(about: dict[str, Any], compile_auto: bool) -> str:
    """The candidate with the least expected training time: median seconds per step times the steps left,
    plus, when compile is "auto", a compiled candidate's warm-up seconds (the run's model compiles again). So
    compile wins only if its saving over the run exceeds its compile time; among equals, the median decides."""
    seconds, steps = about["seconds_per_step"], about["run_steps"]
    cost = about["compile_warmup_seconds"] if compile_auto else {}
    best = min(seconds, key=lambda n: seconds[n] * steps + cost.get(n, 0.0))
    compiled = [n for n in seconds if parts(n)[1]]
    eager = [n for n in seconds if not parts(n)[1]]
    if compile_auto and compiled and eager:
        c, e = min(compiled, key=seconds.get), min(eager, key=seconds.get)
        saving = (seconds[e] - seconds[c]) * steps
        verdict = "kept" if parts(best)[1] else "not kept"
        about["compile_reason"] = (f"compile {verdict}: {c} saves {saving:.1f} s over {steps} steps against {e}, "
                                   f"and compiling took {cost[c]:.1f} s")
    elif compile_auto and about["dropped"] and not compiled:
        about["compile_reason"] = "compile not kept: every compiled candidate failed (see dropped)"
    return best


def from_record(speed_cfg: Any, saved_speed: dict[str, Any]) -> Optional[tuple[str, bool]]:
    """What a resumed run takes for its "auto" settings: the recorded ones (None if the record holds none)."""
    layout, compiled = saved_speed.get("layout"), saved_speed.get("compile", False)
    if layout not in EXACT or not isinstance(compiled, bool):
        return None
    return (layout if speed_cfg.layout == "auto" else speed_cfg.layout,
            compiled if speed_cfg.compile == "auto" else speed_cfg.compile)


def describe(about: dict[str, Any]) -> str:
    """The one line a run prints about its choice."""
    chosen = ", ".join(f"speed.{k} auto -> {str(about[k]).lower()}" for k in about["auto"])
    notes = [about["compile_reason"]] if about.get("compile_reason") else []
    if not about.get("timed"):
        return f"iat: {chosen} ({'; '.join([about['reason'], *notes])})"
    warm = about["compile_warmup_seconds"]
    times = ", ".join(f"{n} {s * 1e3:.1f} ms" + (f" ({warm[n]:.1f} s to compile)" if n in warm else "")
                      for n, s in about["seconds_per_step"].items())
    dropped = [f"{n} dropped ({why})" for n, why in about["dropped"].items()]
    return (f"iat: {chosen} (training step, median of {about['timed_steps']} interleaved after "
            f"{about['warmup_steps']} warm-up, {about['compile_warmup_steps']} compiled: "
            f"{'; '.join([times, *dropped, *notes])})")


def time_candidates(trainer: Host, names: list[str]) -> dict[str, Any]:
    """Median seconds of one training step of each candidate, the compiled ones' warm-up seconds, and the
    compiled ones that raised (dropped, with their errors)."""
    steps = {name: _candidate(trainer, *parts(name)) for name in names}
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    fallible = {name for name in names if parts(name)[1]}
    warmup = {name: COMPILE_WARMUP if name in fallible else WARMUP for name in names}
    seconds, warm, dropped = measure(steps, warmup, TIMED, sync, fallible)
    del steps
    if fallible:
        torch._dynamo.reset()  # the copies' graphs go; the run's model compiles (and recompiles) afresh
    return {"seconds_per_step": seconds, "compile_warmup_seconds": {n: warm[n] for n in fallible if n in seconds},
            "dropped": dropped}


def interleaved_medians(steps: dict[str, Callable[[], Any]], warmup: int, timed: int,
                        sync: Callable[[], None]) -> dict[str, float]:
    """Run every step `warmup` times, then `timed` rounds of one each, the order reversed every round."""
    return measure(steps, dict.fromkeys(steps, warmup), timed, sync)[0]


def measure(steps: dict[str, Callable[[], Any]], warmup: dict[str, int], timed: int, sync: Callable[[], None],
            fallible: frozenset[str] | set[str] = frozenset()
            ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """(median seconds per step, warm-up seconds, errors): each step warms up `warmup[name]` times (timed as a
    whole), then `timed` rounds of one step each run, the order reversed every round. A step in `fallible`
    that raises is dropped with its error; any other's error propagates."""
    dropped: dict[str, str] = {}

    def run(name: str) -> None:
        try:
            steps[name]()
            sync()
        except Exception as err:  # noqa: BLE001  compile failures take many types (dynamo, inductor, triton)
            if name not in fallible:
                raise
            text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # dynamo: 2+ lines
            dropped[name] = f"{type(err).__name__}: {text[:300]}"

    warm: dict[str, float] = {}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:
        t0 = clock()
        for _ in range(warmup[name]):
            if name not in dropped:
                run(name)
        warm[name] = clock() - t0
    names = list(steps)
    for i in range(timed):
        for name in (names if i % 2 == 0 else names[::-1]):
            if name not in dropped:
                sync()
                t0 = clock()
                run(name)
                seconds[name].append(clock() - t0)
    return ({n: statistics.median(v) for n, v in seconds.items() if n not in dropped},
            {n: w for n, w in warm.items() if n not in dropped}, dropped)


def _candidate(trainer: Host, layout: str, compiled: bool) -> Callable[[], Any]:
    """One training step of copies of the trainer's model, method and optimizer in `layout` (under
    torch.compile if `compiled`), on its first training images (this rank's share of the batch)."""
    cfg = trainer.cfg
    speed_cfg = dataclasses.replace(cfg.speed, layout=layout, compile=compiled)
    model = speed.prepare_model(copy.deepcopy(trainer.model), speed_cfg)
    model.train()
    step = StepParts(method=copy.deepcopy(trainer.method), model=model,
                     train_model=speed.maybe_compile(model, speed_cfg), optimizer=make_optimizer(cfg.optim, model),
                     scaler=speed.grad_scaler(trainer.device, cfg.speed.amp), speed=speed_cfg,
                     grad_clip=cfg.optim.grad_clip, device=trainer.device)
    n = cfg.optim.batch_size // trainer.dist.world_size
    x = trainer.train_split.x[:n].to(trainer.device).float().div_(255)
    y = trainer.train_split.y[:n].to(trainer.device)
    step.method.at_step(0, trainer.total_steps)
    return lambda: optimizer_step(step, x, y)
