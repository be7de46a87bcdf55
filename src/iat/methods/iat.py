"""Inverse adversarial training (Dong et al., CVPR 2023, "The Enemy of My Enemy is My Friend").

    L = CE(f(x'), y) + beta * KL( p(x') || p(x~) )

x' is the PGD adversary (ascent on CE); x~ the inverse adversary (PGD DEScent on CE inside an
eps_inv-ball): the nearby point where the model is most confident in y. Options the paper leaves
open are fields here (see docs of METHOD.md): KL direction, detaching the inverse branch, the
inverse loss, eps_inv / steps_inv / step_size_inv (default: the adversary's).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import ce_loss, crafting_mode, kl_div
from ..attacks.losses import LossFn
from ..errors import UsageError
from ..values import setting
from .base import METHODS, Crafted, Method, Metrics, mean_acc, resolve

KL_DIRECTIONS = ("adv||inv", "inv||adv")
INVERSE_LOSSES = ("ce", "ce+kl")


def anchor_kl(logits_adv: torch.Tensor, logits_inv: torch.Tensor, kl_direction: str) -> torch.Tensor:
    """Per-example KL between the adversary and the inverse anchor, in the chosen direction."""
    if kl_direction == "inv||adv":
        return kl_div(logits_inv, logits_adv)
    if kl_direction == "adv||inv":
        return kl_div(logits_adv, logits_inv)
    raise UsageError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")


@dataclasses.dataclass
class InverseAnchor(Method):
    """Base of iat, iat-trades, iat-mart: how the inverse adversary x~ is crafted (None: the threat's value)."""

    eps_inv: Optional[float] = setting(None, bounds="[0, 1]")
    step_size_inv: Optional[float] = setting(None, bounds="(0, inf)")
    steps_inv: Optional[int] = setting(None, bounds="[1, 1e6]")
    inverse_loss: str = "ce"
    detach_inverse: bool = False

    def check_inverse(self, kl_direction: str) -> None:
        """inverse_loss and kl_direction are among their choices."""
        if self.inverse_loss not in INVERSE_LOSSES:
            raise UsageError(f"inverse_loss must be one of {INVERSE_LOSSES}, got {self.inverse_loss!r}")
        if kl_direction not in KL_DIRECTIONS:
            raise UsageError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")

    def inverse_logits(self, model: nn.Module, x_inv: torch.Tensor) -> torch.Tensor:
        """f(x~); with detach_inverse the inverse branch is a fixed teacher (no gradient)."""
        if self.detach_inverse:
            with torch.no_grad():
                return model(x_inv)
        return model(x_inv)

    def inverse_example(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        x_adv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x~ = argmin CE(f(x + d), y) over ||d|| <= eps_inv: the same engine, descending.

        With inverse_loss "ce+kl" (a third-party variant) it minimises
        CE(f(x~), y) + KL(p(x) || p(x~)) - KL(p(x') || p(x~)), which needs x' first; p(x) and p(x')
        are taken without gradient in the BatchNorm mode x~ is crafted in (bn_mode).
        """
        t = self.threat
        eps_inv = resolve(self.eps_inv, t.eps)
        if eps_inv == 0:  # the natural anchor x~ = x: no inverse attack to pay for
            return x.detach().clone()
        loss: Union[str, LossFn] = "ce"
        if self.inverse_loss == "ce+kl":
            if x_adv is None:
                raise ValueError("inverse_loss 'ce+kl' needs the adversarial example")
            with torch.no_grad(), crafting_mode(model, self.bn_mode):  # the BatchNorm mode x~ is crafted in
                nat, adv = model(x).detach(), model(x_adv).detach()

            def ce_kl_loss(logits: torch.Tensor, y: torch.Tensor, _ref=None) -> torch.Tensor:
                return ce_loss(logits, y) + kl_div(nat, logits) - kl_div(adv, logits)

            loss = ce_kl_loss

        attack = self.attack(eps=eps_inv, step_size=resolve(self.step_size_inv, t.step_size),
                             steps=int(resolve(self.steps_inv, t.steps)), descent=True, loss=loss)
        return attack(model, x, y)


@METHODS.register("iat", help="inverse adversarial training: CE(x') + beta KL(p(x') || p(x~)) (Dong et al. 2023)")
@dataclasses.dataclass
class IAT(InverseAnchor):
    """Inverse adversarial training on top of PGD-AT (Dong et al. 2023), l-inf.

    beta: weight of the KL term (3.5). kl_direction: "adv||inv" (default) or "inv||adv".
    detach_inverse: treat p(x~) as a fixed teacher (default False: gradients flow through both).
    eps_inv / step_size_inv / steps_inv: the inverse adversary (default: eps, step_size, steps).
    """

    beta: float = setting(3.5, bounds="[0, inf)")
    kl_direction: str = "adv||inv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_inverse(self.kl_direction)

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x' (PGD ascent on CE), then x~ (PGD descent inside eps_inv)."""
        x_adv = self.attack()(model, x, y)
        return {"x_adv": x_adv, "x_inv": self.inverse_example(model, x, y, x_adv)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x'), y) + beta * KL between p(x') and p(x~) (kl_direction)."""
        logits_adv = model(crafted["x_adv"])
        logits_inv = self.inverse_logits(model, crafted["x_inv"])
        ce = F.cross_entropy(logits_adv, y)
        kl = anchor_kl(logits_adv, logits_inv, self.kl_direction).mean()
        loss = ce + self.beta * kl
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                      "acc_adv": mean_acc(logits_adv, y), "acc_inv": mean_acc(logits_inv, y)}
