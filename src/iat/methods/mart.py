"""MART (Wang et al., ICLR 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples").

    L = mean_i [ BCE(p(x'_i), y_i) + beta * KL( p(x_i) || p(x'_i) ) * (1 - p_y(x_i)) ],   beta = 5

BCE(p, y) = -log p_y - log(1 - max_{k != y} p_k), the boosted cross-entropy; the factor
(1 - p_y(x)) up-weights misclassified natural examples and, as in the reference code, is not
detached. x' is PGD on CE with the reference code's small start and BatchNorm in eval mode.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import kl_div
from ..values import setting
from .base import METHODS, Crafted, Metrics, mean_acc
from .trades import SmallStart, Terms


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p_y - log(1 - max_{k != y} p_k) per example.

    The reference code adds 1e-12 and 1.0001 inside the logs to avoid log(0); here log(1 - p_k) is
    the log-sum-exp of the other logits minus that of all, which is exact and never infinite.
    """
    logits = logits_adv.float()
    log_p = F.log_softmax(logits, dim=1)
    own = F.one_hot(y, logits.shape[1]).bool()
    rival = log_p.masked_fill(own, float("-inf")).argmax(dim=1)  # the most likely wrong class
    not_rival = logits.masked_fill(F.one_hot(rival, logits.shape[1]).bool(), float("-inf"))
    log_not_rival = torch.logsumexp(not_rival, dim=1) - torch.logsumexp(logits, dim=1)
    return -log_p.gather(1, y[:, None]).squeeze(1) - log_not_rival


def true_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_y per example (differentiable)."""
    return F.softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)


def mart_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, Terms]:
    """mean[ BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)) ] (a pure function, for tests)."""
    bce = boosted_ce(logits_adv, y)
    kl = kl_div(logits_nat, logits_adv) * (1 - true_prob(logits_nat, y))
    loss = (bce + beta * kl).mean()
    return loss, {"bce": bce.mean(), "kl": kl.mean()}


@METHODS.register("mart", help="MART: boosted CE(x') + beta KL(p(x) || p(x')) (1 - p_y(x)), beta 5 (Wang et al. 2020)")
@dataclasses.dataclass
class MART(SmallStart):
    """MART (Wang et al. 2020), l-inf or l2.

    beta: weight of the misclassification-aware KL term (5, the paper's ResNet-18 setting).
    init_radius: the small random start (0.001, pixel units). bn_mode: BatchNorm mode while
    crafting ("eval" as in the MART code).
    The adversary runs in the threat model (8/255, 2/255, 10 by default).
    """

    bn_mode: str = "eval"
    beta: float = setting(5.0, bounds="[0, inf)")

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x': PGD on CE from the small start."""
        return {"x_adv": self.small_start()(model, x, y)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """MART's loss on x and x' (mart_objective)."""
        logits_nat, logits_adv = model(x), model(crafted["x_adv"])
        loss, terms = mart_objective(logits_nat, logits_adv, y, self.beta)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                      "acc": mean_acc(logits_nat, y), "acc_adv": mean_acc(logits_adv, y)}
