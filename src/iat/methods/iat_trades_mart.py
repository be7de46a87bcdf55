"""The inverse adversary as the anchor of TRADES' and MART's consistency terms (Dong et al. 2023, Sec. 4).

    iat-trades:  CE(f(x), y) + beta * KL( p(x~) || p(x') )
    iat-mart:    mean[ BCE(p(x'), y) + beta * KL( p(x~) || p(x') ) * (1 - p_y(x)) ]
                 (MART's own weight 1 - p_y(x) of the natural x; mart_weight "inverse": 1 - p_y(x~), iat 0.1)

The host method is unchanged except that x~ (the inverse adversary, from `InverseAnchor`) replaces the
natural x as the anchor: x' is crafted exactly as by the host (TRADES: against KL(p(x) || p(x')); MART:
against CE), with its small start and BatchNorm mode; x~ is crafted right after it, before the training
forward passes (so both see the same BatchNorm statistics). The same open choices as `iat` are options:
kl_direction ("inv||adv" here, since the host's KL puts the anchor first; or "adv||inv"),
detach_inverse, inverse_loss ("ce" | "ce+kl"), eps_inv / step_size_inv / steps_inv.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..values import setting
from .base import METHODS, Crafted, Metrics, mean_acc
from .iat import InverseAnchor, anchor_kl
from .mart import boosted_ce, true_prob
from .trades import SmallStart, Terms


def iat_trades_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, logits_inv: torch.Tensor,
                         y: torch.Tensor, beta: float, kl_direction: str = "inv||adv") -> tuple[torch.Tensor, Terms]:
    """CE(f(x), y) + beta * mean KL(p(x~) || p(x')) (a pure function, for tests)."""
    ce = F.cross_entropy(logits_nat.float(), y)
    kl = anchor_kl(logits_adv, logits_inv, kl_direction).mean()
    return ce + beta * kl, {"ce": ce, "kl": kl}


MART_WEIGHTS = ("natural", "inverse")


def iat_mart_objective(logits_adv: torch.Tensor, logits_inv: torch.Tensor, y: torch.Tensor,
                       beta: float, kl_direction: str = "inv||adv",
                       logits_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Terms]:
    """mean[ BCE(p(x'), y) + beta * KL(p(x~) || p(x')) * (1 - p_y(w)) ] (a pure function, for tests).

    w: the input whose logits are `logits_weight`: the natural x (MART's weight, the method's default); None
    weighs by the inverse adversary x~ itself (mart_weight "inverse")."""
    bce = boosted_ce(logits_adv, y)
    weight_logits = logits_inv if logits_weight is None else logits_weight
    kl = anchor_kl(logits_adv, logits_inv, kl_direction) * (1 - true_prob(weight_logits, y))
    return (bce + beta * kl).mean(), {"bce": bce.mean(), "kl": kl.mean()}


@dataclasses.dataclass
class InverseConsistency(InverseAnchor):
    """Base of iat-trades and iat-mart: the KL direction of an inverse-anchored consistency term (the host's
    KL puts the anchor first)."""

    kl_direction: str = "inv||adv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_inverse(self.kl_direction)


@METHODS.register("iat-trades", help="TRADES with the inverse anchor: CE(x) + beta KL(p(x~) || p(x')), beta 6")
@dataclasses.dataclass
class IATTrades(InverseConsistency, SmallStart):
    """Inverse adversarial training on TRADES (Dong et al. 2023; Zhang et al. 2019), l-inf or l2.

    beta: weight of the KL term (6, TRADES'). x' as in `trades` (init_radius 0.001, bn_mode "eval").
    kl_direction "inv||adv" | "adv||inv"; detach_inverse (False); inverse_loss "ce" | "ce+kl";
    eps_inv / step_size_inv / steps_inv: the inverse adversary (default: eps, step_size, steps).
    """

    bn_mode: str = "eval"
    beta: float = setting(6.0, bounds="[0, inf)")

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x' as TRADES crafts it, then x~."""
        x_adv = self.trades_example(model, x, y)
        return {"x_adv": x_adv, "x_inv": self.inverse_example(model, x, y, x_adv)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x), y) + beta * KL(p(x~) || p(x')) (iat_trades_objective)."""
        logits_nat, logits_adv = model(x), model(crafted["x_adv"])
        logits_inv = self.inverse_logits(model, crafted["x_inv"])
        loss, terms = iat_trades_objective(logits_nat, logits_adv, logits_inv, y, self.beta, self.kl_direction)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                      "acc": mean_acc(logits_nat, y), "acc_adv": mean_acc(logits_adv, y),
                      "acc_inv": mean_acc(logits_inv, y)}


@METHODS.register("iat-mart",
                  help="MART with the inverse anchor: BCE(x') + beta KL(p(x~) || p(x')) (1 - p_y(x)), beta 5")
@dataclasses.dataclass
class IATMart(InverseConsistency, SmallStart):
    """Inverse adversarial training on MART (Dong et al. 2023; Wang et al. 2020), l-inf or l2.

    beta: weight of the KL term (5, MART's). x' as in `mart` (PGD on CE, init_radius 0.001,
    bn_mode "eval"). Other options as in `iat-trades`.
    mart_weight: what weighs the KL term per example. "natural" (default): MART's own 1 - p_y(x), from a
      forward pass on the natural x (differentiable, as in MART's code). "inverse": 1 - p_y(x~) (iat 0.1):
      x~ is built to raise p_y, so this weight is systematically smaller and the effective beta shrinks.
    """

    bn_mode: str = "eval"
    beta: float = setting(5.0, bounds="[0, inf)")
    mart_weight: str = "natural"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mart_weight not in MART_WEIGHTS:
            raise UsageError(f"mart_weight must be one of {MART_WEIGHTS}, got {self.mart_weight!r}")

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x' as MART crafts it (PGD on CE, small start), then x~."""
        x_adv = self.small_start()(model, x, y)
        return {"x_adv": x_adv, "x_inv": self.inverse_example(model, x, y, x_adv)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """BCE(p(x'), y) + beta * KL(p(x~) || p(x')) weighted per mart_weight (iat_mart_objective)."""
        logits_adv = model(crafted["x_adv"])
        logits_inv = self.inverse_logits(model, crafted["x_inv"])
        logits_nat = model(x) if self.mart_weight == "natural" else None
        loss, terms = iat_mart_objective(logits_adv, logits_inv, y, self.beta, self.kl_direction, logits_nat)
        extra = {} if logits_nat is None else {"acc": mean_acc(logits_nat, y)}
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}, **extra,
                      "acc_adv": mean_acc(logits_adv, y), "acc_inv": mean_acc(logits_inv, y)}
