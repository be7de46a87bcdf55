"""Typed run configuration: dataclasses are the single source of truth.

A config file (TOML or JSON, same nesting as the dataclasses) sets values, command-line flags override
it (`iat train --help` is generated from these fields: each one's `help`, default and choices), and the
resolved config is saved with every checkpoint and result. Unknown keys and ill-typed values are errors,
never silently ignored. The `[threat]` section is the run's one `ThreatModel`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (tomllib is tomli, adopted by the standard library)
    import tomli as tomllib

from .errors import UsageError
from .registry import did_you_mean
from .threat import ThreatModel
from .values import AutoBool, coerce, setting  # setting: also imported from here by other sections' modules

AUGMENTS = ("auto", "none", "crop-flip", "crop")
AMPS = ("none", "bf16", "fp16")
LAYOUTS = ("auto", "nchw", "channels_last")


@dataclasses.dataclass
class DataConfig:
    """The data set, its split and augmentation."""

    name: str = setting("mnist", "data set", choices="datasets", flag="dataset")
    root: Optional[str] = setting(None, "data root folder; none: $IAT_DATA_DIR, else ./data", flag="data-dir")
    val_size: Optional[int] = setting(None, "training images held out for validation and checkpoint selection "
                                      "(default: 1000, or a tenth of a training set under 10,000)", flag="val-size")
    augment: str = setting("auto", "augmentation (auto: crop+flip for RGB, none for grey)", choices=AUGMENTS,
                           flag="augment")
    download: bool = setting(False, "download the data set if it is missing")


@dataclasses.dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and the training length."""

    optimizer: str = setting("sgd", "optimizer", choices="optimizers", flag="optimizer")
    epochs: int = setting(10, "training epochs", flag="epochs", bounds="[1, 1e9]")
    batch_size: int = setting(128, "global batch size (split over torchrun processes)", flag="batch-size",
                         bounds="[1, 1e9]")
    lr: float = setting(0.1, "peak learning rate", flag="lr", bounds="(0, inf)")
    momentum: float = setting(0.9, "SGD momentum", bounds="[0, 1)")
    weight_decay: float = setting(5e-4, "weight decay", flag="weight-decay", bounds="[0, inf)")
    nesterov: bool = setting(False, "Nesterov momentum (SGD)")
    schedule: str = setting("piecewise", "learning-rate schedule, per step", choices="schedules", flag="schedule")
    milestones: tuple[float, ...] = setting((0.5, 0.75), "piecewise: fractions of training where lr *= gamma",
                                            bounds="[0, 1]")
    gamma: float = setting(0.1, "piecewise: lr factor at each milestone", bounds="(0, inf)")
    peak: float = setting(0.4, "cyclic: fraction of training at which lr peaks", bounds="(0, 1)")
    grad_clip: float = setting(0.0, "clip the gradient norm to this (0: off)", bounds="[0, inf)")
    eps_warmup: float = setting(0.0, "fraction of training over which eps and step size ramp up from 0 (a per-step "
                                "scale of the threat model)", flag="eps-warmup", bounds="[0, 1)")
    ema_decay: float = setting(0.0, "EMA of the weights after each step, this decay (warmed up; 0: off; e.g. 0.999): "
                               "also validated, saved as best-ema and last-ema", flag="ema-decay", bounds="[0, 1)")


@dataclasses.dataclass
class ValConfig:
    """Per-epoch validation on the held-out split; the best checkpoint is chosen on robust accuracy."""

    attack: str = setting("pgd", "validation attack, in the run's threat model (step eps/4)", choices="attacks",
                          flag="val-attack")
    steps: int = setting(10, "steps of the validation attack", flag="val-steps", bounds="[1, 1e6]")
    n_examples: int = setting(1000, "held-out examples scored each epoch", flag="val-examples", bounds="[0, 1e9]")
    batch_size: int = setting(500, "validation batch size", bounds="[1, 1e9]")


@dataclasses.dataclass
class SpeedConfig:
    """Speed options; they change the arithmetic, so they are part of the run's identity ("auto" in layout or
    compile is resolved when a run starts, by training.layout, and recorded as what it chose)."""

    amp: str = setting("none", "autocast of training and attack forwards (opt-in: changes the numerics)",
                       choices=AMPS)
    layout: str = setting("auto", "memory layout of model and inputs: nchw, channels_last (NHWC), or auto (time a "
                          "few training steps in each at the start and keep the faster; both compute the same "
                          "function)", choices=LAYOUTS)
    compile: AutoBool = setting("auto", "torch.compile the model used for training forwards: true, false, or auto "
                                "(on CUDA, in a long enough run, also time each layout compiled and keep compile "
                                "if its saving pays for its compile time; on CPU false, untimed)")


@dataclasses.dataclass
class DistributedConfig:
    """Settings of multi-process (torchrun) runs; a single process ignores them."""

    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch of all processes (torch's "
                            "SyncBatchNorm on CUDA, an all-reduce elsewhere)", flag="sync-bn")


@dataclasses.dataclass
class TrainConfig:
    """A training run: method, model, seed, device and every section; what `iat train` resolves and saves."""

    method: str = setting("iat", "training method", choices="methods", flag="method")
    model: str = setting("cnn", "architecture: a registered name or package.module:factory, a factory(num_classes=, "
                         "in_channels=, input_size=) returning an nn.Module (its module on PYTHONPATH)",
                         choices="models", flag="model")
    seed: int = setting(0, "random seed of data order, attacks and weights", flag="seed", bounds="[0, 2**63)")
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda or cuda:N", flag="device")
    method_options: dict[str, Any] = setting(help="the method's options (-O KEY=VALUE)", factory=dict)
    data: DataConfig = setting(factory=DataConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    threat: ThreatModel = setting(factory=ThreatModel)
    val: ValConfig = setting(factory=ValConfig)
    speed: SpeedConfig = setting(factory=SpeedConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    checkpoint_every_steps: int = setting(0, "also save the training state every N batches (0: only at the end "
                                          "of each epoch)", flag="checkpoint-every", bounds="[0, 1e12]")
    checkpoint_every_minutes: float = setting(0.0, "also save the training state mid-epoch once this many minutes "
                                              "have passed since the last save, so a preempted, requeued job loses "
                                              "at most that much training (0: off)",
                                              flag="checkpoint-every-minutes", bounds="[0, inf)")
    progress: bool = setting(True, "progress bars")
    tensorboard: bool = setting(False, "also write TensorBoard event files to RUN/tensorboard/ (pip install "
                                "\"iat[tensorboard]\")", flag="tensorboard")
    tensorboard_every: int = setting(50, "TensorBoard: log the training loss every N batches",
                                     flag="tensorboard-every", bounds="[1, 1e12]")


# Keys of older configs that moved: a clear pointer instead of "unknown key".
MOVED = {"threat.bn_mode": "method_options.bn_mode (--bn-mode)", "threat.eps_warmup": "optim.eps_warmup (--eps-warmup)",
         "speed.channels_last": "speed.layout (auto, nchw or channels_last)"}


def update(cfg: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Set nested values from a dict (a parsed config file), rejecting unknown keys; returns cfg.

    Frozen sections (the ThreatModel) are replaced by an updated copy, which checks itself.
    """
    hints = get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            if path in MOVED:
                raise UsageError(f"config key {path} has moved to {MOVED[path]}")
            raise UsageError(f"unknown config key {path!r}{did_you_mean(key, names)}; valid keys here: "
                             f"{', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"config key {path} must be a table (section), got {value!r}")
            changes[key] = update(current, value, prefix=f"{path}.")
        else:
            changes[key] = coerce(value, hints[key], f"config key {path}")
    if type(cfg).__dataclass_params__.frozen:
        return dataclasses.replace(cfg, **changes)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def set_path(cfg: Any, dotted: str, value: Any) -> Any:
    """Set one dotted key, e.g. set_path(cfg, "optim.lr", "0.05")."""
    return update(cfg, nest(dotted, value))


def nest(dotted: str, value: Any) -> dict:
    """"a.b.c", v -> {"a": {"b": {"c": v}}}."""
    head, _, rest = dotted.partition(".")
    return {head: nest(rest, value) if rest else value}


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    """json.loads' object hook: a key given twice in one object is refused, as TOML refuses it
    (json alone would keep the last value silently)."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise UsageError(f"config file {path}: key {key!r} appears twice in one table; keep one")
        table[key] = value
    return table


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Parse a TOML or JSON config file into a dict; a malformed file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; give a .toml or .json file")
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        else:
            data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UsageError(
            f"config file {path} is malformed: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is malformed: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table of settings")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (what checkpoints and results record)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from defaults updated by nested `values` (a recorded or parsed config), checked as `update`."""
    return update(TrainConfig(), values)
