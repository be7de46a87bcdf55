"""Device and seed handling, resolved once at the edge (library code infers device from tensors)."""
from __future__ import annotations

import random
from typing import cast

import numpy as np
import torch

from ..errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when present, else CPU; an unavailable device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's seeds every CUDA device too).

    Args:
        seed: the seed; NumPy takes it modulo 2**32.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain numbers (what checkpoints can hold)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from `rng_state()`'s dict; those it lacks (and CUDA's without CUDA) stay as they are."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
