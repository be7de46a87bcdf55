"""Exponential moving average (EMA) of the weights, `optim.ema_decay` (`--ema-decay`; 0, the default, is off).

As in Gowal et al. 2020 ("Uncovering the limits of adversarial training against norm-bounded adversarial
examples") and Rebuffi et al. 2021 ("Fixing data augmentation to improve adversarial robustness"): after
every optimizer step, ema = d * ema + (1 - d) * weights. Choices, each deliberate:

- The decay warms up: d = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 0, 1, ...), as in Gowal
  et al.'s code, so that the average is not dominated by the random initial weights in short runs; the
  first update copies the weights (torch's `AveragedModel`), so the EMA never contains the initialisation.
- Parameters are averaged; buffers (BatchNorm running mean and variance, batch counts) are copied from the
  model after every step (`AveragedModel(use_buffers=False)`). The running statistics are already an
  exponential average of recent batches, and averaging the integer batch count is meaningless; copied
  statistics belong to recent weights, which is what a decay close to 1 makes the EMA weights close to late
  in training. (timm's ModelEmaV2 averages buffers instead; that would be another run.)
- The EMA is updated from the bare model (not the DDP or torch.compile wrapper); under DDP every rank holds
  the same weights after the step, so every rank keeps the same EMA without communication (BatchNorm
  buffers can differ between ranks as the model's own do; rank 0's are the ones checkpointed and validated).

The EMA (weights and update count) is part of the training state (`last.safetensors`), so a resumed run
continues it bit for bit; `best-ema` / `last-ema` checkpoints hold the EMA weights in the format of
`best` / `last` weights, so `iat eval RUN --checkpoint last-ema` evaluates them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..evaluation.accuracy import robust_accuracy
from ..records import MetricLine
from ..runtime import distributed
from .progress import Progress

KINDS = ("best-ema", "last-ema")  # checkpoint names beside best and last


def warm_decay(decay: float, n: int) -> float:
    """The decay of the n-th update (n = 0 first): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1 + n) / (10 + n))


class WeightEMA:
    """The EMA of a model's parameters (buffers copied), on the model's device; `module` is the EMA model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0  # a Python copy of AveragedModel.n_averaged: no device sync per step
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=False)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The EMA model: a copy of the model's architecture holding the averaged weights."""
        return self.averaged.module

    @torch.no_grad()
    def _lerp(self, ema: Union[tuple[torch.Tensor, ...], list[torch.Tensor]],
              current: Union[tuple[torch.Tensor, ...], list[torch.Tensor]], _: Any) -> None:
        # ema + (1 - d) * (current - ema) = d * ema + (1 - d) * current
        torch._foreach_lerp_(ema, current, 1.0 - warm_decay(self.decay, self.updates))

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights in (after an optimizer step)."""
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the update count (part of the training state, so a resume continues the EMA)."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)


def end_epoch(ema: Optional[WeightEMA], p: Progress, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Any],
              *, batch_size: int, device: torch.device,
              save_best: Callable[[str, dict[str, torch.Tensor]], None]) -> dict[str, Any]:
    """Validate the EMA weights as the model is validated (`attacks` on the validation examples x, y), save
    best-ema through `save_best(name, weights)` when its robust accuracy improved; the MetricLine fields of
    the EMA (empty without an EMA)."""
    if ema is None:
        return {}
    acc = robust_accuracy(ema.module, x, y, attacks, batch_size=batch_size).rates()
    acc = distributed.from_main(acc, device)  # rank 0's numbers decide, as for the model
    if acc["robust"] > p.best_ema_robust:
        p.best_ema_robust, p.best_ema_epoch = acc["robust"], p.epoch
        save_best("best-ema", ema.module.state_dict())
    return {"val_natural_ema": acc["natural"], "val_robust_ema": acc["robust"], "best_ema_epoch": p.best_ema_epoch}


def summary(line: MetricLine) -> str:
    """The EMA's part of the epoch's printed line (a MetricLine): empty without an EMA."""
    if line.val_robust_ema is None:
        return ""
    return f"ema natural {line.val_natural_ema:.2%} robust {line.val_robust_ema:.2%}  "
