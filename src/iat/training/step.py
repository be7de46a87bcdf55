"""One optimizer step of a method: what the trainer runs each batch and the layout timer runs on copies."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..methods import Method
from . import distributed, speed


@dataclass
class StepParts:
    """What a training step touches: `model` holds the weights, `train_model` is what the forward runs
    through (the model itself, or its DDP / torch.compile wrapper)."""

    method: Method
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    speed: object       # config.SpeedConfig with a resolved layout
    grad_clip: float
    device: torch.device


def optimizer_step(p: StepParts, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss (autocast if asked for), backward, clipping, optimizer and scaler step."""
    x = speed.prepare_input(x, p.speed)
    with p.method.step_context(p.train_model):
        with speed.autocast(p.device, p.speed.amp), distributed.sharded_noise():
            loss, metrics = p.method.loss(p.train_model, x, y)
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()  # DDP averages the gradients over ranks here
        p.method.after_backward(p.train_model)
        if p.grad_clip > 0:
            p.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), p.grad_clip)
        p.scaler.step(p.optimizer)
        p.scaler.update()
    return loss, metrics
