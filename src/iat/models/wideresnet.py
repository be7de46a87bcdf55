"""WideResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), as in the TRADES and AWP code.

Depth 6n + 4, three stages of n pre-activation blocks of widths (16, 32, 64) x widen_factor, dropout 0.
Two details follow that code rather than the paper: when a block changes width, its input is
pre-activated first and the 1x1 shortcut reads the pre-activated tensor; and convs get He-normal
initialisation with fan_out, BN weight 1 / bias 0, linear bias 0. TRADES' unused `sub_block1` is
left out (it holds parameters that never receive gradients), so its checkpoints need that key dropped.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, check_input_size


class WideBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-(dropout)-conv plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if c_in != c_out:  # in WRNs every stride change is also a width change
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU-conv twice (dropout between), plus the (projected) input."""
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen: 3x3 stem of 16 channels, three wide stages, BN-ReLU, global pool, linear."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout)
                  for i in range(n)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He normal, fan_out, exactly as the TRADES code writes it
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of normalised images."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # Adaptive pooling equals the reference avg_pool2d(8) at 32x32 and also allows other sizes.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _wide_factory(name: str, depth: int, widen_factor: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        check_input_size(name, input_size, 16)
        return WideResNet(depth, widen_factor, num_classes, in_channels)

    factory.__doc__ = f"WideResNet-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016), dropout 0."
    return factory


MODELS.register("wrn-34-10", help="WideResNet-34-10 as in TRADES/AWP (Zagoruyko & Komodakis 2016)")(
    _wide_factory("wrn-34-10", 34, 10))
MODELS.register("wrn-28-10", help="WideResNet-28-10 (Zagoruyko & Komodakis 2016)")(
    _wide_factory("wrn-28-10", 28, 10))
