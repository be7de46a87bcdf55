"""Small CNNs for fast CPU experiments on 28x28 (MNIST-like) and 32x32 (CIFAR-like) images.

`cnn` has no BatchNorm, so train/eval mode does not change its output; `cnn4` adds BatchNorm after
every conv so that the attack engine's BN-mode option is exercised on a model that is still cheap.
"""
from __future__ import annotations

from torch import nn

from .base import MODELS, check_input_size


def _conv_bn_relu(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    # A conv followed by BN needs no bias: BN's shift makes it redundant.
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not bn)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()] if bn else [conv, nn.ReLU()]


@MODELS.register("cnn", help="small 2-conv CNN, no BatchNorm; the fast CPU demo model")
def cnn(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Two 3x3 conv + max-pool stages (32, 64 channels), then a 256-unit hidden layer."""
    check_input_size("cnn", input_size, 8)
    side = input_size // 2 // 2
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32, bn=False), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64, bn=False), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


@MODELS.register("cnn4", help="4-conv CNN with BatchNorm for 32x32 CPU experiments")
def cnn4(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Conv blocks (32, 32) pool (64, 64) pool, each conv followed by BatchNorm and ReLU."""
    check_input_size("cnn4", input_size, 8)
    side = input_size // 2 // 2
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32, bn=True), *_conv_bn_relu(32, 32, bn=True), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64, bn=True), *_conv_bn_relu(64, 64, bn=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )
