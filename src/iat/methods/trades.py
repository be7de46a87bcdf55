"""TRADES (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

    L = CE(f(x), y) + beta * KL( p(x) || p(x') ),   beta = 6

x' maximises KL(p(x) || p(x + d)) over the eps-ball (l-inf or l2): the engine's "kl" loss with the
natural prediction as the detached reference. Gradients of the training loss flow through both
p(x) and p(x'), as in the reference code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD, crafting_mode, kl_div
from ..values import setting
from .base import METHODS, Crafted, Method, Metrics, mean_acc

Terms = dict[str, torch.Tensor]


@dataclasses.dataclass
class SmallStart(Method):
    """Base of trades, mart and their inverse variants: the adversary of the TRADES and MART reference code.

    Their code starts at x + 0.001 * N(0, I), only to leave the point x where the KL term and its
    gradient are zero. The engine's equivalent: a uniform start of radius init_radius = 0.001
    (pixel units; 0 starts at x). BatchNorm is in eval mode while crafting in both reference codes,
    hence the subclasses' bn_mode default "eval".
    """

    init_radius: float = setting(0.001, bounds="[0, 1]")

    def small_start(self, **overrides: Any) -> PGD:
        """The method's PGD with the small start; the radius is absolute, so it survives eps warm-up."""
        eps: float = overrides.get("eps", self.threat.eps)
        scale = min(1.0, self.init_radius / eps) if eps > 0 else 0.0
        return self.attack(random_start=self.init_radius > 0, init_scale=scale, **overrides)

    def trades_example(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x' = argmax KL(p(x) || p(x + d)); the reference p(x) is taken in the crafting BN mode."""
        with torch.no_grad(), crafting_mode(model, self.bn_mode):
            reference = model(x)
        return self.small_start(loss="kl")(model, x, y, reference=reference)


def trades_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, Terms]:
    """CE(f(x), y) + beta * mean KL(p(x) || p(x')), from logits (a pure function, for tests)."""
    ce = F.cross_entropy(logits_nat.float(), y)
    kl = kl_div(logits_nat, logits_adv).mean()
    return ce + beta * kl, {"ce": ce, "kl": kl}


@METHODS.register("trades", help="TRADES: CE(x) + beta KL(p(x) || p(x')), beta 6 (Zhang et al. 2019)")
@dataclasses.dataclass
class TRADES(SmallStart):
    """TRADES (Zhang et al. 2019), l-inf or l2.

    beta: weight of the KL term (6). init_radius: the small random start (0.001, pixel units).
    bn_mode: BatchNorm mode while crafting ("eval" as in the TRADES code; "train" | "keep").
    The inner maximisation runs in the threat model (8/255, 2/255, 10 by default).
    """

    bn_mode: str = "eval"
    beta: float = setting(6.0, bounds="[0, inf)")

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x': PGD ascent on KL(p(x) || p(x')) from the small start."""
        return {"x_adv": self.trades_example(model, x, y)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x), y) + beta * KL(p(x) || p(x')) (trades_objective)."""
        logits_nat, logits_adv = model(x), model(crafted["x_adv"])
        loss, terms = trades_objective(logits_nat, logits_adv, y, self.beta)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                      "acc": mean_acc(logits_nat, y), "acc_adv": mean_acc(logits_adv, y)}
