"""Standard training and PGD adversarial training (Madry et al. 2018)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, Metrics, mean_acc


@METHODS.register("standard", help="natural training on clean inputs, no attack")
@dataclasses.dataclass
class Standard(Method):
    """Empirical risk minimisation: CE(f(x), y)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": mean_acc(logits, y)}


@METHODS.register("pgd-at", help="PGD adversarial training, CE on PGD-K examples (Madry et al. 2018)")
@dataclasses.dataclass
class PGDAT(Method):
    """Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".

    L = CE(f(x'), y) with x' from PGD-`steps` (l-inf eps, step_size, random start).
    """

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        x_adv = self.attack()(model, x, y)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc_adv": mean_acc(logits, y)}
