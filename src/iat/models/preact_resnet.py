"""PreActResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The architecture of Wong et al. 2020 ("Fast is better than free") and Rice et al. 2020 ("Overfitting
in adversarially robust deep learning"): BN-ReLU before each conv, the projection shortcut taken from
the pre-activated input, a final BN-ReLU before pooling. PyTorch's default initialisation, as in their
code. The pool is adaptive, so at 32x32 it equals their avg_pool2d(4) and other sizes also work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, check_input_size
from .resnet import make_stage


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut, with no activation after the add."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU-conv twice, plus the (projected) input."""
        out = F.relu(self.bn1(x))
        # The reference takes the projection from the pre-activated tensor, the identity from x.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut  # out of place: GradAlign double-backwards through this


class PreActResNet(nn.Module):
    """3x3 stem, four pre-activation stages (64, 128, 256, 512), BN-ReLU, global pool, linear."""

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        widths, strides = [64, 128, 256, 512], [1, 2, 2, 2]
        stages, c_in = [], 64
        for c_out, n, stride in zip(widths, num_blocks, strides, strict=True):  # four stages
            stages.append(make_stage(PreActBlock, c_in, c_out, n, stride))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of normalised images."""
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register(
    "preact-resnet18", help="PreActResNet-18 (He et al. 2016; Wong et al. 2020, Rice et al. 2020)"
)
def preact_resnet18(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """PreActResNet-18 for 32x32 images: PreActBlocks [2, 2, 2, 2], about 11.2M parameters."""
    check_input_size("preact-resnet18", input_size, 16)
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)
