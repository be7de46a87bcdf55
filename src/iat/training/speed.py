"""Opt-in speed options of a training run (config section [speed]), applied by the trainer only.

amp: autocast ("bf16" | "fp16") around the method's loss, which covers the attack's forward passes and
the training forward; the attack engine keeps delta and the eps-ball arithmetic in fp32 (its input
x + delta is fp32, the gradient is cast to fp32 before the step, projection and [0, 1] clamp are fp32),
so no perturbation leaves the ball. fp16 adds a GradScaler. channels_last: NHWC model and inputs.
compile: torch.compile of the training model (attacks run it too; crafting flips requires_grad, so
expect a recompile or two at the start).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from ..errors import UsageError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate(speed) -> None:
    if speed.amp not in AMP_DTYPES:
        raise UsageError(f"speed.amp must be one of {', '.join(AMP_DTYPES)}, got {speed.amp!r}")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Mixed precision for forwards inside (a no-op for amp = "none")."""
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16; disabled (a pass-through) otherwise, so the trainer has one code path."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def memory_format(speed) -> torch.memory_format:
    return torch.channels_last if speed.channels_last else torch.contiguous_format


def prepare_model(model: nn.Module, speed) -> nn.Module:
    """channels_last weights (in place; the module is the same object)."""
    return model.to(memory_format=torch.channels_last) if speed.channels_last else model


def prepare_input(x: torch.Tensor, speed) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if speed.channels_last and x.dim() == 4 else x


def maybe_compile(model: nn.Module, speed) -> nn.Module:
    return torch.compile(model) if speed.compile else model
