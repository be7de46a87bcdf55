"""Data sets as uint8 tensors, a registry of them, and a reproducible batch loader.

    bundle = load_dataset("mnist", root="data")        # DataBundle: train/test Splits, classes, mean/std
    loader = BatchLoader(bundle.train, 128, shuffle=True, augment=True, device="cuda")
    for x, y in loader: ...                             # x float32 in [0, 1], NCHW, on the device
"""
from __future__ import annotations

# Importing the modules registers their data sets.
from . import cifar, cifar10_jpeg, imagefolder, mnist, svhn, synthetic  # noqa: F401
from .core import (
    DATASETS,
    DataBundle,
    Split,
    default_root,
    fetch_dataset,
    load_dataset,
    train_val_split,
)
from .loader import BatchLoader
from .standards import STANDARDS, resolve_threat, standard_eps, standard_stats, standard_threat

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "Split",
    "default_root",
    "fetch_dataset",
    "load_dataset",
    "STANDARDS",
    "resolve_threat",
    "standard_eps",
    "standard_stats",
    "standard_threat",
    "train_val_split",
]
