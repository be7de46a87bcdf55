"""Attacks: the one `PGD` engine (`engine.py`), its losses (`losses.py`), the registry of named attacks
(`registry.py`) with its presets (`presets.py`) and the AutoAttack adapter (`autoattack.py`).

`create_attack(name, eps=..., **overrides)`. Step sizes default to eps / 4 (2/255 at 8/255), the
convention of the PGD-20 protocol, so the same preset works on MNIST (eps 0.3) and CIFAR-10.
"""
from __future__ import annotations

from . import autoattack, presets  # noqa: F401  (they register their attacks; autoattack imports pyautoattack lazily)
from .engine import PGD, crafting_mode
from .losses import ATTACK_LOSSES, ce_loss, cw_margin_loss, kl_div, kl_to_reference
from .registry import ATTACKS, Attack, Natural, create_attack

__all__ = ["ATTACKS", "ATTACK_LOSSES", "PGD", "Attack", "Natural", "create_attack", "crafting_mode",
           "ce_loss", "cw_margin_loss", "kl_div", "kl_to_reference"]
