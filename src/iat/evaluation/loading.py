"""Finding and loading trained models: a run directory or a checkpoint file.

iat writes safetensors (tensors plus a JSON header), which loading cannot turn into code. A PyTorch
`.pt` from elsewhere is a pickle, and unpickling can run anything the file names; such a file is read
with `torch.load(weights_only=True)`, which accepts tensors and plain containers only and refuses
the rest before anything runs.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from ..errors import UsageError
from ..models import create_model
from ..runtime.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from ..data import DataBundle

# A zip (torch.save since 1.6) or a bare pickle (protocol >= 2 starts with 0x80): not safetensors.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def checkpoint_path(target: Union[str, Path], which: str = "best") -> Path:
    """RUN_DIR -> RUN_DIR/checkpoints/{which}.safetensors; a file path is returned as is."""
    target = Path(target)
    if target.is_dir():
        path = target / "checkpoints" / f"{which}.safetensors"
        if not path.is_file():
            raise UsageError(f"{target} holds no {which} checkpoint ({path} is missing); is it an iat run directory?")
        return path
    if not target.exists():
        raise UsageError(f"{target} does not exist; pass a run directory or a .safetensors checkpoint")
    return target


def load_model(path: Union[str, Path], device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (strictly: same architecture)."""
    if is_pickle(path):
        return load_model_file(path, device=device)
    state = load_checkpoint(path)
    spec = state.get("model_spec")
    if not isinstance(spec, dict) or "model" not in state:
        raise UsageError(f"checkpoint {path} holds no model")
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), lines[0] if lines else "")
        raise UsageError(f"checkpoint {path} does not fit model {spec['name']}: {detail[:300]}") from None
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(f"checkpoint {path} holds non-finite weights ({bad[0]}); it cannot be evaluated, use "
                         "another checkpoint")
    model.to(device).eval()
    return model, state


def is_pickle(path: Union[str, Path]) -> bool:
    """True for a PyTorch pickle (`torch.save` output) rather than a safetensors file.

    A safetensors file starts with its 8-byte little-endian header length and then the JSON header's "{",
    so a header length whose low byte is 0x80 (one file in 32) is not mistaken for a pickle's 0x80.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return False
    return head.startswith(PICKLE_MAGIC)


def model_spec_for(model: str, bundle: DataBundle) -> dict[str, Any]:
    """Everything needed to rebuild architecture `model` for the images and classes of `bundle`.
    Models take square input_size x input_size images: other images are refused here, not deep in torch."""
    _, c, h, w = bundle.train.x.shape
    if h != w:
        raise UsageError(f"{bundle.name} has {h}x{w} images but models take square ones (input_size x input_size); "
                         "resize or crop the images to a square size")
    return {"name": model, "num_classes": bundle.num_classes, "in_channels": int(c),
            "input_size": int(h), "mean": list(bundle.mean), "std": list(bundle.std)}


def load_model_file(path: Union[str, Path], model: Optional[str] = None, bundle: Optional[DataBundle] = None,
                    device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load an iat checkpoint, or a PyTorch state_dict `.pt` as architecture `model` sized for `bundle`.

    A `.pt` is read weights-only: one that would run code on loading is refused and its code never runs.
    Returns (model in eval mode, state); for a `.pt` the state is {"kind": "state-dict", "model_spec",
    "model", "resolved": None}, as the file records no training settings.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if not is_pickle(path):
        return load_model(path, device)
    weights = _state_dict(_weights_only(path), path)
    if model is None or bundle is None:
        raise UsageError(f"{path} is a plain PyTorch state_dict that records no architecture; name it with "
                         "--model NAME and --dataset NAME")
    spec = model_spec_for(model, bundle)
    net = create_model(model, **{k: v for k, v in spec.items() if k != "name"})
    _check_shapes(net, weights, path, model)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    # The Normalize buffers may be absent from a state_dict saved elsewhere: the data set's statistics stay.
    missing = [k for k in missing if not k.startswith("normalize.")]
    if missing or unexpected:
        keys = missing or unexpected
        raise UsageError(f"{path} does not fit model {model}: {'missing' if missing else 'unexpected'} keys "
                         f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    net.to(device).eval()
    return net, {"kind": "state-dict", "model_spec": spec, "model": weights, "resolved": None}


def _weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" ({culprit.group(1)})" if culprit else ""
        raise UsageError(f"refusing to load {path}: it holds Python objects{what}, not only tensors, and "
                         "unpickling them could run code; load only files you trust, or convert them") from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can fail anywhere inside torch.load
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{path} is unreadable or truncated ({first})") from None


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, also when wrapped as {"state_dict": ...} or saved from DataParallel."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} holds no state_dict (a dict of parameter name -> tensor)")
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return obj


def _check_shapes(net: nn.Module, weights: dict[str, torch.Tensor], path: Path, model: str) -> None:
    """Shapes must match (another class count or width is named here rather than deep in torch)."""
    own = net.state_dict()
    for key, value in weights.items():
        if key in own and own[key].shape != value.shape:
            raise UsageError(f"{path} does not fit model {model}: {key} is {list(value.shape)} in the file "
                             f"but {list(own[key].shape)} in the model (another architecture or class count?)")
