"""One optimizer step of a method: what the trainer runs each batch and the layout timer runs on copies."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.engine import noise_of_global_batch
from ..config import SpeedConfig
from ..methods import Method
from ..runtime import distributed
from . import speed


@dataclass
class StepParts:
    """What a training step touches: `model` holds the weights, `train_model` is what the forward runs
    through (the model itself, or its DDP / torch.compile wrapper)."""

    method: Method
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    speed: SpeedConfig  # with a resolved layout
    grad_clip: float
    device: torch.device


def optimizer_step(p: StepParts, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`Method.train_step` (the one step user loops run too) with the trainer's input layout, autocast if asked
    for, DDP noise drawn for the global batch, the AMP scaler and gradient clipping."""
    x = speed.prepare_input(x, p.speed)
    metrics = p.method.train_step(p.train_model, x, y, p.optimizer, p.scaler, grad_clip=p.grad_clip,
                                  forward_context=lambda: _forward(p))
    return metrics["loss"], metrics


@contextmanager
def _forward(p: StepParts) -> Iterator[None]:
    with speed.autocast(p.device, p.speed.amp), sharded_noise():
        yield


@contextmanager
def sharded_noise() -> Iterator[None]:
    """Inside, the attack engine draws noise for the whole global batch and keeps this rank's slice."""
    me = distributed.info()
    with noise_of_global_batch(me.rank, me.world_size):
        yield
