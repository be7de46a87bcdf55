"""Data containers, the data-set registry and the entry points load_dataset / fetch_dataset.

A data set is a registered factory `factory(root, download=False, **kw) -> DataBundle`; `root` is the data
root and each data set reads its own sub-folder of it. Data sets that can be downloaded also register a
fetcher, which is what `iat data fetch NAME --root DIR` runs.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UsageError
from ..registry import Registry

DATASETS: Registry[DataBundle] = Registry("data set")
# name -> fetcher(root: Path, **kw) -> folder. Kept beside DATASETS, not in it, because not every data set
# can be fetched (synthetic is generated, imagefolder is the user's own folder).
FETCHERS: dict[str, Callable[..., Path]] = {}


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')} tensor of shape {list(t.shape)}"
    return type(t).__name__


@dataclass
class Split:
    """One split of a data set. Images stay uint8 (a quarter of float32's memory); loaders convert per batch."""

    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
            raise UsageError(f"images must be a uint8 tensor [N, C, H, W], got a {_describe(x)}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.ndim != 1:
            raise UsageError(f"labels must be an int64 tensor [N], got a {_describe(y)}")
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"a split has {x.shape[0]} images but {y.shape[0]} labels; they must match")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    """A data set ready for training: both splits, class names, train-split channel statistics, provenance."""

    name: str
    train: Split
    test: Split
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]  # per channel, images in [0, 1]; models normalise with these
    std: tuple[float, ...]
    source: str  # which copy of the data this is, for results files

    def __post_init__(self) -> None:
        if self.num_classes < 1 or len(self.classes) != self.num_classes:
            raise UsageError(
                f"data set {self.name!r} has {len(self.classes)} class names for {self.num_classes} classes"
            )
        for part, split in (("train", self.train), ("test", self.test)):
            _check_split(self.name, part, split, self.num_classes)
        if self.train.x.shape[1:] != self.test.x.shape[1:]:
            raise UsageError(
                f"data set {self.name!r}: train images are {list(self.train.x.shape[1:])} but test images "
                f"are {list(self.test.x.shape[1:])}; both splits must have the same image shape"
            )
        channels = self.train.x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise UsageError(f"data set {self.name!r}: mean/std must have one value per channel ({channels})")


def _check_split(name: str, part: str, split: Split, num_classes: int) -> None:
    if len(split) == 0:
        raise UsageError(f"the {part} split of data set {name!r} is empty; check the data folder")
    lo, hi = int(split.y.min()), int(split.y.max())
    if lo < 0 or hi >= num_classes:
        raise UsageError(
            f"labels of the {part} split of {name!r} must lie in [0, {num_classes}), found {lo}..{hi}; "
            "the label file does not match this data set"
        )


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units.

    Summed in float64 over chunks, so 50k CIFAR images need ~100 MB at a time rather than 1.2 GB.
    """
    n, c, h, w = x.shape
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for part in x.split(chunk):
        f = part.to(torch.float64)
        total += f.sum((0, 2, 3))
        squares += f.square().sum((0, 2, 3))
    count = n * h * w
    mean = total / count / 255.0
    std = (squares / count / 255.0**2 - mean.square()).clamp_min(0).sqrt()
    # A constant channel would make the model's Normalize divide by zero; one grey level is a safe floor.
    std = std.clamp_min(1 / 255)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def make_bundle(name: str, train: Split, test: Split, classes: list[str], source: str) -> DataBundle:
    """Validate freshly read splits and wrap them with channel statistics of the train split."""
    for part, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise UsageError(f"the {part} split of data set {name!r} is empty; check the data folder")
    mean, std = channel_stats(train.x)
    return DataBundle(name, train, test, len(classes), list(classes), mean, std, source)


def register_fetcher(name: str) -> Callable[[Callable[..., Path]], Callable[..., Path]]:
    """Mark `fetcher(root, **kw) -> folder` as the way to download data set `name`."""

    def deco(fetcher: Callable[..., Path]) -> Callable[..., Path]:
        FETCHERS[name] = fetcher
        return fetcher

    return deco


def default_root() -> Path:
    """The data root: $IAT_DATA_DIR if set, else ./data."""
    env = os.environ.get("IAT_DATA_DIR")
    return Path(env).expanduser() if env else Path("data")


def resolve_root(root: str | Path | None) -> Path:
    """The data root a command uses: `root` if given (with ~ expanded), else `default_root()`."""
    return Path(root).expanduser() if root is not None else default_root()


def _check_kwargs(kind: str, name: str, func: Callable[..., Any], kw: dict[str, Any]) -> None:
    """Turn a misspelt option into a UsageError before the call, rather than a TypeError from deep inside."""
    try:
        inspect.signature(func).bind(Path("."), **kw)
    except TypeError as e:
        raise UsageError(f"{kind} {name!r} does not accept these options {sorted(kw)}: {e}") from None


def load_dataset(name: str, root: str | Path | None = None, download: bool = False, **kw: Any) -> DataBundle:
    """Load data set `name` from `root` (default: default_root()); download it first if asked and missing."""
    factory = DATASETS.get(name)
    _check_kwargs("data set", name, factory, {"download": download, **kw})
    bundle = factory(resolve_root(root), download=download, **kw)
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"data set factory {name!r} returned {type(bundle).__name__}, not DataBundle")
    return bundle


def fetch_dataset(name: str, root: str | Path | None = None, **kw: Any) -> Path:
    """Download data set `name` into `root` (what `iat data fetch NAME` runs) and return its folder."""
    DATASETS.get(name)  # an unknown name gets the registry's list of choices
    if name not in FETCHERS:
        fetchable = ", ".join(sorted(FETCHERS))
        raise UsageError(
            f"data set {name!r} is generated or read from a folder you give, so there is nothing to fetch; "
            f"fetchable data sets: {fetchable}"
        )
    fetcher = FETCHERS[name]
    _check_kwargs("fetcher for", name, fetcher, kw)
    return fetcher(resolve_root(root), **kw)


def auto_val_size(n: int) -> int:
    """1000 held-out examples, or a tenth of a training set smaller than 10,000."""
    return 1000 if n >= 10_000 else n // 10


def train_val_split(split: Split, val_size: Optional[int], seed: int) -> tuple[Split, Split]:
    """Hold `val_size` examples of `split` out for validation (None: auto_val_size); the same seed always
    picks the same ones. Both parts keep the original order of their examples, so only the seeded choice
    differs between seeds.
    """
    n = len(split)
    if val_size is None:
        val_size = auto_val_size(n)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < n:
        raise UsageError(f"val_size must be an integer in [0, {n}) for a split of {n} examples, got {val_size!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    return Split(split.x[train_idx], split.y[train_idx]), Split(split.x[val_idx], split.y[val_idx])
