"""Optimizers and learning-rate schedules, each a registry (`iat train --optimizer`, `--schedule`).

A schedule is a multiplier of the base lr at optimizer step t of T (schedules run per step, not per
epoch, so a resumed or re-batched run follows the same curve).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config import OptimConfig
from ..registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
SCHEDULES: Registry[Callable[[float], float]] = Registry("lr schedule")


@OPTIMIZERS.register("sgd", help="SGD with momentum, weight decay and optional Nesterov momentum")
def sgd(o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """torch's SGD over the model's parameters with the config's lr, momentum, weight_decay and nesterov."""
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


@OPTIMIZERS.register("adam", help="Adam with (coupled) weight decay")
def adam(o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """torch's Adam over the model's parameters with the config's lr and weight_decay."""
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


@SCHEDULES.register("piecewise", help="lr x gamma at each milestone (fractions of training)")
def piecewise(o: OptimConfig) -> Callable[[float], float]:
    """Fraction of training -> lr multiplier: gamma to the power of the milestones reached."""
    return lambda frac: o.gamma ** sum(frac >= m for m in o.milestones)


@SCHEDULES.register("cosine", help="cosine decay from lr to 0")
def cosine(o: OptimConfig) -> Callable[[float], float]:
    """Fraction of training -> lr multiplier: (1 + cos(pi * fraction)) / 2, 0 from the end of training on."""
    return lambda frac: 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


@SCHEDULES.register("cyclic", help="linear up to lr at `peak`, then linear down to 0 (Wong et al. 2020)")
def cyclic(o: OptimConfig) -> Callable[[float], float]:
    """Fraction of training -> lr multiplier: from 0 up to 1 at `peak`, then down to 0 at the end."""
    return lambda frac: frac / o.peak if frac < o.peak else max(0.0, (1 - frac) / (1 - o.peak))


@SCHEDULES.register("constant", help="lr throughout")
def constant(o: OptimConfig) -> Callable[[float], float]:
    """Fraction of training -> lr multiplier: always 1."""
    return lambda frac: 1.0


def make_optimizer(o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The registered optimizer `o.optimizer` over the model's parameters (an unknown name is a UsageError)."""
    return OPTIMIZERS.get(o.optimizer)(o, model)


def lr_factor(o: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step t."""
    by_fraction = SCHEDULES.get(o.schedule)(o)
    total = max(total_steps, 1)
    return lambda t: by_fraction(t / total)
