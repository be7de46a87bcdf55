"""Finding and loading trained models: a run directory or a checkpoint file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from torch import nn

from .checkpoint import load_checkpoint
from .models import create_model
from .registry import UsageError


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
    state = load_checkpoint(path)
    spec = state.get("model_spec")
    if not isinstance(spec, dict) or "model" not in state:
        raise UsageError(f"checkpoint {path} holds no model")
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UsageError(f"checkpoint {path} does not fit model {spec['name']}: {first}") from None
    model.to(device).eval()
    return model, state
