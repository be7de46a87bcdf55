"""Accuracy against eps (Carlini et al. 2019: a plot that must fall to about 0) and its two checks.

The sweep attacks the same examples at each eps; eps 0 is natural accuracy. At the full range (every
image in [0, 1]^d reachable: 1 for l-inf, sqrt(d) for l2) any working attack reaches 0%.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..attacks import Attack, Natural, create_attack
from ..errors import UsageError
from ..threat import make_ball
from .accuracy import robust_accuracy
from .sanity import MASKING, Check, _slack


def full_range_eps(norm: str, input_numel: int) -> float:
    """The radius from which every image in [0, 1]^d is reachable: an attack there must reach 0%."""
    return make_ball(norm, 0.0).full_range(input_numel)


def default_sweep(eps: float, norm: str, input_numel: int) -> list[float]:
    """0, eps/4 .. 4 eps, the radius that holds the all-grey image (0.5 l-inf) and the full range."""
    top = full_range_eps(norm, input_numel)
    values = {0.0, top / 2, top, *(eps * f for f in (0.25, 0.5, 1, 2, 4))}
    return sorted(v for v in values if v <= top)


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Sequence[float], *,
              attack: str = "pgd20", norm: str = "linf", batch_size: int = 256, seed: int = 0,
              progress: bool = False) -> list[dict[str, Any]]:
    """Accuracy under `attack` at each eps, on the same examples (eps 0 is natural accuracy)."""
    attacks: dict[str, Attack] = {}
    for e in sorted(set(float(v) for v in eps_values)):
        if e < 0:
            raise UsageError(f"--eps-sweep values must be >= 0, got {e}")
        attacks[f"eps={e:g}"] = Natural() if e == 0 else create_attack(attack, eps=e, norm=norm)
    gen = torch.Generator().manual_seed(seed)
    acc = robust_accuracy(model, x, y, attacks, batch_size=batch_size, progress=progress, desc="eps sweep",
                          generator=gen)
    return [{"eps": float(a.describe()["eps"]), "correct": acc.correct[k], "total": acc.total,
             "accuracy": acc.correct[k] / acc.total, "protocol": a.describe()} for k, a in attacks.items()]


def check_eps_sweep(points: Sequence[Mapping[str, Any]], natural: int, norm: str, input_numel: int,
                    zero_tol: float = 0.05) -> list[Check]:
    """Accuracy must fall as eps grows, start at natural accuracy and reach about 0 at the full range."""
    n = points[0]["total"]
    counts = [p["correct"] for p in points]
    rises = [f"{points[i]['eps']:g} -> {points[i + 1]['eps']:g}" for i in range(len(points) - 1)
             if counts[i + 1] > counts[i] + _slack(n)]
    start_ok = points[0]["eps"] > 0 or counts[0] == natural
    details = {"eps": [p["eps"] for p in points], "correct": counts, "total": n}
    if rises or not start_ok:
        why = f"accuracy rises with eps at {', '.join(rises)}" if rises else "accuracy at eps 0 differs from natural"
        monotone = Check("eps_sweep_decreasing", "warn", f"{why}: a larger ball contains the smaller one, so the "
                         f"attack is failing to find what it found before, which suggests {MASKING}", details)
    else:
        monotone = Check("eps_sweep_decreasing", "pass", "accuracy never rises as eps grows", details)
    top, last = full_range_eps(norm, input_numel), points[-1]
    if last["eps"] < top - 1e-9:
        reach = Check("eps_sweep_reaches_zero", "skip", f"the sweep stops at eps {last['eps']:g}; add {top:g} "
                      "(every image reachable) to check that accuracy reaches 0", details)
    elif last["accuracy"] > zero_tol:
        reach = Check("eps_sweep_reaches_zero", "warn", f"accuracy is still {last['accuracy']:.1%} at eps {top:g}, "
                      f"where every image is reachable: the attack is broken or {MASKING}", details)
    else:
        reach = Check("eps_sweep_reaches_zero", "pass", f"accuracy reaches {last['accuracy']:.1%} at eps {top:g}",
                      details)
    return [monotone, reach]
