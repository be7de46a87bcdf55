"""Checkpoints: tensors in safetensors, everything else as JSON in its header; atomic writes.

A checkpoint file is either the old one or the new one, never torn (records.atomic_write_bytes).
Loading parses JSON and raw tensors only, so a checkpoint can never execute code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UsageError
from ..records import atomic_write_bytes

FORMAT = "iat-checkpoint-1"


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by references into `tensors`; keep dict key types (optimizer states use ints)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: Union[str, Path], state: dict[str, Any]) -> None:
    """Save a nested dict of tensors, numbers, strings, lists and dicts."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "s", tensors)
    data = st_save(tensors, metadata={"format": FORMAT, "tree": json.dumps(tree)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load what save_checkpoint wrote; a missing, truncated or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise ValueError("not an iat checkpoint")
        return _unflatten(json.loads(meta["tree"]), tensors)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"checkpoint {path} is unreadable or truncated ({err}); use another checkpoint") from None
