"""The model registry, the Normalize front module, and create_model.

Normalisation lives inside the model (as in RobustBench and MadryLab's robustness library), so every
attack works on images in [0, 1] and eps is in pixel units whatever the data set's mean and std.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..registry import Registry

# factory(num_classes: int, in_channels: int, input_size: int) -> nn.Module, the body after Normalize.
MODELS: Registry[nn.Module] = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel, for NCHW images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or not mean:
            raise UsageError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if not all(s > 0 for s in std):
            raise UsageError(f"std must be positive in every channel, got {std}")
        # Buffers (not parameters): they move with .to() and are saved in the state dict, so a
        # checkpoint carries its own normalisation, but the optimizer never touches them.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def check_input_size(model: str, input_size: int, min_size: int) -> None:
    """Raise UsageError unless the architecture can take input_size x input_size images."""
    if input_size < min_size:
        raise UsageError(
            f"model {model!r} needs input_size >= {min_size} (e.g. 28 or 32), got {input_size}"
        )


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """Build Sequential(normalize=Normalize(mean, std), net=<registered body>) returning logits."""
    factory = MODELS.get(name)  # unknown names fail first, with the list of choices
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{arg} must be an integer, got {value!r}")
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise UsageError(f"in_channels must be at least 1, got {in_channels}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise UsageError(
            f"mean and std need {in_channels} values (one per input channel), "
            f"got {len(mean)} and {len(std)}"
        )
    normalize = Normalize(mean, std)
    net = factory(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return nn.Sequential(OrderedDict(normalize=normalize, net=net))


def model_info(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and whether BatchNorm is present (it decides whether BN mode matters)."""
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    }
