"""What a run is built from, checked before any work starts: the config's names and values, the method
with the run's one threat model, the batch loader."""
from __future__ import annotations

import dataclasses
from typing import Any

from .. import config as C
from ..data import BatchLoader, Split
from ..errors import UsageError
from ..methods import Method, create_method
from ..registry import Registry, did_you_mean
from ..values import check_bounds
from . import speed


def registries() -> dict[str, Registry]:
    """The registries config fields name as their choices (config.setting(choices="methods"))."""
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..methods import METHODS
    from ..models import MODELS
    from ..threat import BALLS
    from .optim import OPTIMIZERS, SCHEDULES

    return {"methods": METHODS, "models": MODELS, "datasets": DATASETS, "attacks": ATTACKS, "norms": BALLS,
            "optimizers": OPTIMIZERS, "schedules": SCHEDULES}


def check_choices(cfg: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Every field lies in its range, and every field with choices holds one of them (a typo suggests the
    nearest name)."""
    named = registries()
    check_bounds(cfg, prefix)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.", skip)
            continue
        choices = f.metadata.get("choices")
        if choices is None or f"{prefix}{f.name}" in skip:
            continue
        if isinstance(choices, str):
            named[choices].get(value)  # "unknown method 'x' (did you mean ...); choose one of: ..."
        elif value not in choices:
            raise UsageError(f"{prefix}{f.name} {value!r} is not one of {', '.join(choices)}"
                             f"{did_you_mean(value, choices)}")


def validate_config(cfg: C.TrainConfig, own_data: bool = False) -> None:
    """Check the values no component checks for itself, before any work starts (own_data: the caller hands
    the trainer its own data bundle, so data.name need not be a registered data set)."""
    check_choices(cfg, skip=("data.name",) if own_data else ())  # and every field's range
    if cfg.threat.eps == 0:
        raise UsageError("eps is 0: there is no threat to train against; give --eps > 0 (or train --method standard)")
    speed.validate(cfg.speed)


def build_method(cfg: C.TrainConfig) -> Method:
    """The method with the run's threat model; eps & co. among its options are refused (they would disagree)."""
    method = create_method(cfg.method, threat=cfg.threat, **cfg.method_options)
    method.attack()  # checks eps, step size and steps now rather than at the first step
    return method


def make_loader(cfg: C.TrainConfig, train: Split, n_val: int, rank: int, world: int, device: Any) -> BatchLoader:
    """Seeded, shuffled, augmented batches of this rank's share of the global batch."""
    c, n, batch = train.x.shape[1], len(train), cfg.optim.batch_size
    if batch > n:
        raise UsageError(f"batch size {batch} is larger than the training split ({n} examples after holding "
                         f"out {n_val} for validation); lower the batch size or val_size")
    augment = cfg.data.augment
    if augment == "auto":
        augment = "crop-flip" if c == 3 else "none"
    if batch % world:
        raise UsageError(f"batch size {batch} (the global batch) must be divisible by the {world} processes")
    return BatchLoader(train, batch // world, shuffle=True, seed=cfg.seed, augment=augment != "none",
                       flip=augment == "crop-flip", device=device, drop_last=True, rank=rank, world_size=world)
