"""A tiny, learnable, deterministic data set for tests: each class is a fixed random pattern plus noise."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .core import DATASETS, DataBundle, Split, make_bundle


def _check(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"synthetic: {name} must be an integer >= {low}, got {value!r}")
    return value


def _templates(num_classes: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Distinct random 3x3 patterns of grey levels 0.2 / 0.8 per class, smoothly upscaled to size x size."""
    bits = 9 * channels
    if num_classes > 2**bits:
        raise UsageError(f"synthetic: at most {2**bits} classes fit {channels} channel(s), got {num_classes}")
    codes: list[int] = []
    while len(codes) < num_classes:  # redraw the rare duplicate so that no two classes share a template
        code = int(torch.randint(0, 2**bits, (1,), generator=g))
        if code not in codes:
            codes.append(code)
    coarse = torch.tensor([[(code >> b) & 1 for b in range(bits)] for code in codes], dtype=torch.float32)
    coarse = coarse.reshape(num_classes, channels, 3, 3) * 0.6 + 0.2
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _make_split(templates: torch.Tensor, n: int, noise: float, g: torch.Generator) -> Split:
    k = templates.shape[0]
    # Balanced classes in a seeded random order.
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    x = templates[y] + noise * torch.randn((n, *templates.shape[1:]), generator=g)
    return Split(x.clamp(0, 1).mul(255).round().to(torch.uint8), y)


@DATASETS.register("synthetic", help="tiny generated data set (class templates + noise) for tests and smoke runs")
def synthetic(
    root: Path | None = None,
    download: bool = False,
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 4,
    channels: int = 1,
    size: int = 16,
    seed: int = 0,
    noise: float = 0.2,
) -> DataBundle:
    """Images = class template + Gaussian noise, clipped to [0, 1] and stored as uint8.

    Templates are distinct random 3x3 patterns (grey levels 0.2 / 0.8) smoothly upscaled to `size`:
    coarse enough that a 4-pixel random crop keeps most of the pattern, so augmentation slows learning
    down but does not erase the signal.
    `root` and `download` are ignored: nothing is read or fetched. The same arguments give the same data.
    """
    _check("n_train", n_train, 1)
    _check("n_test", n_test, 1)
    _check("num_classes", num_classes, 2)
    _check("size", size, 4)
    if channels not in (1, 3):
        raise UsageError(f"synthetic: channels must be 1 or 3, got {channels!r}")
    g = torch.Generator().manual_seed(int(seed))
    templates = _templates(num_classes, channels, size, g)
    train = _make_split(templates, n_train, float(noise), g)
    test = _make_split(templates, n_test, float(noise), g)
    classes = [f"class{i}" for i in range(num_classes)]
    source = f"synthetic (templates + noise, seed={seed}, {channels}x{size}x{size}, {num_classes} classes)"
    return make_bundle("synthetic", train, test, classes, source)
