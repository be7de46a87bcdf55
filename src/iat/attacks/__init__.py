"""Attack presets: each is the one `PGD` engine with a few arguments fixed.

`create_attack(name, eps=..., **overrides)`. Step sizes default to eps / 4 (2/255 at 8/255), the
convention of the PGD-20 protocol, so the same preset works on MNIST (eps 0.3) and CIFAR-10.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ..registry import Registry
from .engine import PGD, crafting_mode
from .losses import ATTACK_LOSSES, ce_loss, cw_margin_loss, kl_div, kl_to_reference


class Natural:
    """No attack: the natural (clean) input, for accuracy tables."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **_: Any) -> torch.Tensor:
        return x.detach()

    def describe(self) -> dict:
        return {"eps": 0.0, "steps": 0}


Attack = Union[PGD, Natural]
ATTACKS: Registry[Attack] = Registry("attack")


def _pgd(steps: int, loss: str = "ce", descent: bool = False):
    def factory(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
        kw.setdefault("steps", steps)
        return PGD(eps=eps, step_size=step_size or eps / 4, loss=loss, descent=descent, **kw)

    return factory


@ATTACKS.register("natural", help="no attack: clean accuracy")
def natural(**_: Any) -> Natural:
    return Natural()


@ATTACKS.register("fgsm", help="FGSM (Goodfellow et al. 2015): one step of size eps, no random start")
def fgsm(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
    kw.update(steps=1, random_start=False)
    return PGD(eps=eps, step_size=step_size or eps, **kw)


@ATTACKS.register("fgsm-rs", help="FGSM with random start, step 1.25 eps (Wong et al. 2020)")
def fgsm_rs(eps: float = 8 / 255, step_size: Optional[float] = None, **kw: Any) -> PGD:
    kw.setdefault("steps", 1)
    return PGD(eps=eps, step_size=step_size or 1.25 * eps, **kw)


ATTACKS.register("pgd", help="PGD-10 on CE, random start, step eps/4 (Madry et al. 2018)")(_pgd(10))
ATTACKS.register("pgd20", help="PGD-20 on CE, random start, step eps/4")(_pgd(20))
ATTACKS.register("pgd100", help="PGD-100 on CE, random start, step eps/4")(_pgd(100))
ATTACKS.register("cw", help="CW-inf: PGD-30 on the Carlini-Wagner margin loss")(_pgd(30, "cw"))
ATTACKS.register("inverse-pgd", help="inverse adversary: PGD-10 DEScent on CE (Dong et al. 2023)")(
    _pgd(10, descent=True)
)


def create_attack(name: str, **kw: Any) -> Attack:
    """Build a preset by name; keyword arguments override its defaults (eps, steps, norm, ...)."""
    return ATTACKS.create(name, **kw)


__all__ = ["ATTACKS", "ATTACK_LOSSES", "PGD", "Natural", "create_attack", "crafting_mode",
           "ce_loss", "cw_margin_loss", "kl_div", "kl_to_reference"]

from . import autoattack as _autoattack  # noqa: E402,F401  (registers "autoattack"; imports pyautoattack lazily)
