"""The one table of what the field takes as standard for each data set: its threat model and its channel
statistics.

`iat train` and `iat eval` use the threat model when the user gives no eps (the resolved value is written to
config.json, so a run always records explicit numbers); `create_model(..., dataset=NAME)` uses the statistics.
Data sets without an entry (synthetic, imagefolder: there is no field standard) keep the generic defaults.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Optional

from ..errors import UsageError
from ..threat import ThreatModel


@dataclasses.dataclass(frozen=True)
class Standard:
    """A data set's standard l-inf threat model (pixel units) and, where published, its train-split mean/std."""

    threat: ThreatModel
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None


# MNIST: Madry et al. 2018 (0.3, PGD-40 of step 0.01). Fashion-MNIST: 0.1 with the PGD-5 of step 0.025 that
# this project's Fashion-MNIST experiments use (src/iat/experiments/*fashion-mnist.toml). CIFAR and SVHN:
# 8/255 with PGD-10 of step 2/255 (Madry et al.; Rice et al. 2020). Statistics: the train splits' per-channel
# mean and std in [0, 1] units (what data.core.channel_stats computes; MNIST and Fashion-MNIST checked
# against the official files). The JPEG copy of CIFAR-10 records no statistics of its own.
_CIFAR = ThreatModel(eps=8 / 255, step_size=2 / 255, steps=10)
STANDARDS: dict[str, Standard] = {
    "mnist": Standard(ThreatModel(eps=0.3, step_size=0.01, steps=40), (0.1307,), (0.3081,)),
    "fashion-mnist": Standard(ThreatModel(eps=0.1, step_size=0.025, steps=5), (0.2860,), (0.3530,)),
    "cifar10": Standard(_CIFAR, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar10-jpeg": Standard(_CIFAR),
    "cifar100": Standard(_CIFAR, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": Standard(_CIFAR, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def standard_threat(name: str) -> ThreatModel:
    """The standard threat model of data set `name`; a UsageError (asking for --eps) if it has none."""
    if name not in STANDARDS:
        raise UsageError(f"data set {name!r} has no standard threat model; give --eps (and --norm, default linf)")
    return STANDARDS[name].threat


def standard_eps(name: str) -> float:
    """The standard eps (pixel units) of data set `name`."""
    return standard_threat(name).eps


def standard_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of data set `name`, for create_model(dataset=name)."""
    entry = STANDARDS.get(name)
    if entry is None or entry.mean is None or entry.std is None:
        known = ", ".join(n for n, s in STANDARDS.items() if s.mean is not None)
        raise UsageError(f"data set {name!r} has no standard mean/std; pass mean= and std= (known: {known})")
    return entry.mean, entry.std


def resolve_threat(name: str, threat: ThreatModel, given: Collection[str]) -> tuple[ThreatModel, str]:
    """The run's threat model and where it came from, for a config whose threat keys `given` were typed.

    With eps given, nothing changes (a config with explicit values means what it always meant). Without it,
    the data set's standard supplies eps, step size and steps, except those given; a data set without one
    keeps the generic defaults (l-inf 8/255, 2/255 x 10).
    """
    if "eps" in given:
        return threat, "as given"
    if name not in STANDARDS:
        return threat, f"the generic default; {name} has no standard threat model"
    standard = STANDARDS[name].threat
    if threat.norm != standard.norm:
        raise UsageError(f"the standard threat model of {name} is {standard.norm}; with --norm {threat.norm} "
                         "give --eps too")
    fields = {k: getattr(standard, k) for k in ("eps", "step_size", "steps") if k not in given}
    return dataclasses.replace(threat, **fields), f"the standard threat model of {name}"
