"""The attack registry: every attack `iat` can run, by name (`ATTACKS`), and `create_attack`. The presets
(`presets.py`) and the AutoAttack adapter (`autoattack.py`) register themselves here."""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import nn

from ..registry import Registry


class Natural:
    """No attack: the natural (clean) input, for accuracy tables."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None, **_: Any) -> torch.Tensor:
        return x.detach()

    def describe(self) -> dict:
        """The protocol, for results files: no perturbation (eps 0, no steps)."""
        return {"eps": 0.0, "steps": 0}


class Attack(Protocol):
    """What every registered attack is: the perturbed batch for (model, x, y), and what it is (eps, steps, ...)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor: ...

    def describe(self) -> dict:
        """The attack's parameters (eps, steps, ...), written next to its numbers in results files."""
        ...


ATTACKS: Registry[Attack] = Registry("attack")


def create_attack(name: str, **kw: Any) -> Attack:
    """Build a preset by name; keyword arguments override its defaults (eps, steps, norm, ...)."""
    return ATTACKS.create(name, **kw)
