"""Per-example losses the attack engine ascends (adversary) or descends (inverse adversary).

Each takes (logits, y, reference) and returns one value per example, so restarts can keep the
worst case per example. `reference` is the detached logits of an anchor (TRADES' natural
prediction) for the KL loss and is ignored by the others.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
ATTACK_LOSSES: Registry[torch.Tensor] = Registry("attack loss")


@ATTACK_LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy CE(f(x), y) per example."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@ATTACK_LOSSES.register("cw")
def cw_margin_loss(
    logits: torch.Tensor, y: torch.Tensor, reference: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y (positive once misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


@ATTACK_LOSSES.register("kl")
def kl_to_reference(
    logits: torch.Tensor, y: torch.Tensor, reference: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """KL(p(reference) || p(x)) per example: the TRADES inner maximisation."""
    if reference is None:
        raise ValueError("the 'kl' attack loss needs reference logits (the anchor's prediction)")
    log_p = F.log_softmax(logits.float(), dim=1)
    log_q = F.log_softmax(reference.float(), dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1)


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per example, from logits, computed in fp32 for stability."""
    log_p = F.log_softmax(p_logits.float(), dim=1)
    log_q = F.log_softmax(q_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)
