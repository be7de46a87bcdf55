"""Typed run configuration: dataclasses are the single source of truth.

A config file (TOML or JSON, same nesting as the dataclasses) sets values, command-line flags
override it, and the resolved config is saved with every checkpoint and result. Unknown keys and
ill-typed values are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

from .errors import UsageError
from .values import parse_number


@dataclasses.dataclass
class DataConfig:
    name: str = "mnist"
    root: Optional[str] = None          # data root; default $IAT_DATA_DIR or ./data
    val_size: int = 1000                # held out from the training set for checkpoint selection
    augment: str = "auto"               # auto (crop+flip for RGB, none for grey) | none | crop-flip | crop
    download: bool = False


@dataclasses.dataclass
class OptimConfig:
    optimizer: str = "sgd"              # sgd | adam
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"         # piecewise | cosine | cyclic | constant
    milestones: tuple[float, ...] = (0.5, 0.75)   # piecewise: fractions of training where lr *= gamma
    gamma: float = 0.1
    peak: float = 0.4                   # cyclic: fraction of training at which lr peaks
    grad_clip: float = 0.0              # 0 disables


@dataclasses.dataclass
class ThreatConfig:
    """The training threat model (the method's adversary)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    bn_mode: Optional[str] = None       # BatchNorm mode while crafting: train | eval | keep; None: the method's default
    eps_warmup: float = 0.0             # fraction of training over which eps and step size ramp up from 0


@dataclasses.dataclass
class ValConfig:
    """Per-epoch validation on the held-out split; the best checkpoint is chosen on robust accuracy."""

    attack: str = "pgd"                 # PGD-10, step eps/4, random start
    steps: int = 10
    n_examples: int = 1000
    batch_size: int = 500


@dataclasses.dataclass
class SpeedConfig:
    """Opt-in speed options; they change the arithmetic, so they are part of the run's identity."""

    amp: str = "none"                   # none | bf16 | fp16: autocast of training and attack forwards
    channels_last: bool = False         # NHWC memory format for model and inputs
    compile: bool = False               # torch.compile the model used for training forwards


@dataclasses.dataclass
class TrainConfig:
    method: str = "iat"
    model: str = "cnn"
    seed: int = 0
    device: str = "auto"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    threat: ThreatConfig = dataclasses.field(default_factory=ThreatConfig)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    speed: SpeedConfig = dataclasses.field(default_factory=SpeedConfig)
    checkpoint_every_steps: int = 0     # 0: only at the end of each epoch
    progress: bool = True


def _convert(path: str, value: Any, kind: Any) -> Any:
    """Convert a file or flag value to the declared field type, with a clear error."""
    args = getattr(kind, "__args__", ())
    if kind is Any or kind is dict or getattr(kind, "__origin__", None) is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key {path} must be a table of key = value, got {value!r}")
        return dict(value)
    if getattr(kind, "__origin__", None) is Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(a for a in args if a is not type(None))
    if getattr(kind, "__origin__", None) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        return tuple(parse_number(v, path) for v in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise UsageError(f"config key {path} must be true or false, got {value!r}")
    if kind is int:
        number = parse_number(value, path)
        if number != int(number):
            raise UsageError(f"config key {path} must be an integer, got {value!r}")
        return int(number)
    if kind is float:
        return parse_number(value, path)
    return str(value)


def update(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set nested values from a dict (a parsed config file), rejecting unknown keys."""
    hints = get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise UsageError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"config key {path} must be a table (section), got {value!r}")
            update(current, value, prefix=f"{path}.")
        else:
            setattr(cfg, key, _convert(path, value, hints[key]))


def set_path(cfg: Any, dotted: str, value: Any) -> None:
    """Set one dotted key, e.g. set_path(cfg, "optim.lr", "0.05")."""
    head, _, rest = dotted.partition(".")
    update(cfg, {head: _nest(rest, value) if rest else value})


def _nest(dotted: str, value: Any) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Parse a TOML or JSON config file into a dict; a malformed file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"config file {path} is malformed: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table of settings")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    update(cfg, values)
    return cfg
