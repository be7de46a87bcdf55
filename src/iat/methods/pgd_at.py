"""PGD adversarial training (Madry et al. 2018) and its no-attack limit, standard training."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Crafted, Method, Metrics, mean_acc


@METHODS.register("standard", help="natural training on clean inputs, no attack")
@dataclasses.dataclass
class Standard(Method):
    """Empirical risk minimisation: CE(f(x), y). Crafts nothing."""

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x), y) on the clean batch."""
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": mean_acc(logits, y)}


@METHODS.register("pgd-at", help="PGD adversarial training, CE on PGD-K examples (Madry et al. 2018)")
@dataclasses.dataclass
class PGDAT(Method):
    """Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".

    L = CE(f(x'), y) with x' from PGD-`steps` of the threat model (random start, step_size).
    """

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x': PGD in the threat model."""
        return {"x_adv": self.attack()(model, x, y)}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x'), y)."""
        logits = model(crafted["x_adv"])
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc_adv": mean_acc(logits, y)}
