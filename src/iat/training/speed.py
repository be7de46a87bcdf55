"""Speed options of a training run (config section [speed]), applied by the trainer only.

amp: autocast ("bf16" | "fp16") around the method's loss, which covers the attack's forward passes and
the training forward; the attack engine keeps delta and the eps-ball arithmetic in fp32 (its input
x + delta is fp32, the gradient is cast to fp32 before the step, projection and [0, 1] clamp are fp32),
so no perturbation leaves the ball. fp16 adds a GradScaler; amp is opt-in, because it changes the numerics.
layout: "channels_last" is NHWC model and inputs, "nchw" the default format. compile: true puts the training
forward under torch.compile (attacks run it too; crafting flips requires_grad, so expect a recompile or two at
the start). "auto" (the default of both) is resolved by training.layout when the run starts: the fastest of the
exact candidates by a few timed steps (compiled ones on CUDA only), recorded in config.json as what ran.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Optional, cast

import torch
from torch import nn

from ..errors import UsageError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate(speed) -> None:
    """A UsageError unless amp is none / bf16 / fp16 and compile is auto, true or false."""
    if speed.amp not in AMP_DTYPES:
        raise UsageError(f"speed.amp must be one of {', '.join(AMP_DTYPES)}, got {speed.amp!r}")
    if not (speed.compile == "auto" or isinstance(speed.compile, bool)):
        raise UsageError(f"speed.compile must be auto, true or false, got {speed.compile!r}")


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """Mixed precision for forwards inside (a no-op for amp = "none")."""
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16; disabled (a pass-through) otherwise, so the trainer has one code path."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def channels_last(speed) -> bool:
    """Whether the layout is "channels_last" (NHWC)."""
    return speed.layout == "channels_last"


def memory_format(speed) -> torch.memory_format:
    """torch's memory format of the layout: channels_last, else contiguous (NCHW)."""
    return torch.channels_last if channels_last(speed) else torch.contiguous_format


def prepare_model(model: nn.Module, speed) -> nn.Module:
    """channels_last weights (in place; the module and its parameters stay the same objects)."""
    if not channels_last(speed):
        return model
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it


def prepare_input(x: torch.Tensor, speed) -> torch.Tensor:
    """A 4-D batch in channels_last memory for that layout; x itself otherwise."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last(speed) and x.dim() == 4 else x


def maybe_compile(model: nn.Module, speed) -> nn.Module:
    """torch.compile for compile = true (the trainer resolves "auto" to a bool before it builds the forward)."""
    if speed.compile not in (True, False):
        raise ValueError(f"speed.compile {speed.compile!r} is not resolved to true or false")
    return cast(nn.Module, torch.compile(model)) if speed.compile else model  # an OptimizedModule


def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[str]:
    """What gives this machine native bf16 arithmetic ("AMX", "AVX-512 BF16", the GPU's name), or None."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    found = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    return " and ".join(found) or None


def bf16_hint(device: torch.device, speed) -> Optional[str]:
    """One line for runs in fp32 on a machine with native bf16: the option exists and what it costs."""
    native = native_bf16(device) if speed.amp == "none" else None
    if not native:
        return None
    return (f"iat: this machine has native bf16 ({native}); --set speed.amp=bf16 may train faster but changes the "
            "numerics (benchmarks/speed_option_strength.py measures its cost in accuracy)")
