"""ResNet-18, CIFAR variant (He et al. 2016, "Deep Residual Learning for Image Recognition").

As in the widely used kuangliu/pytorch-cifar code that PGD-AT, TRADES and MART baselines build on:
a 3x3 stride-1 stem with no max-pool (32x32 images are already small), BasicBlocks [2, 2, 2, 2] of
widths 64-512, global average pooling. PyTorch's default initialisation, as in that code. The pool is
adaptive, so other input sizes (e.g. 28x28) work; at 32x32 it equals the original avg_pool2d(4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, check_input_size


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (post-activation)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut only where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv-BN-ReLU, conv-BN, plus the (projected) input, then ReLU."""
        # Out-of-place ReLU and add: GradAlign differentiates through the input gradient again.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(block: type[nn.Module], c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` residual blocks; only the first one changes width and resolution."""
    layers = [block(c_in, c_out, stride)] + [block(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages (64, 128, 256, 512), global pool, linear head."""

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides = [64, 128, 256, 512], [1, 2, 2, 2]
        stages, c_in = [], 64
        for c_out, n, stride in zip(widths, num_blocks, strides, strict=True):  # four stages
            stages.append(make_stage(BasicBlock, c_in, c_out, n, stride))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of normalised images."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("resnet18", help="ResNet-18, CIFAR variant (He et al. 2016)")
def resnet18(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """ResNet-18 for 32x32 images: BasicBlocks [2, 2, 2, 2], about 11.2M parameters."""
    # Three stride-2 stages: below 16 the last stage is 1x1 and BatchNorm at batch 1 breaks.
    check_input_size("resnet18", input_size, 16)
    return ResNet([2, 2, 2, 2], num_classes, in_channels)
