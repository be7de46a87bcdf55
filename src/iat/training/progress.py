"""Where a run stands: the counters the trainer advances, saves in every checkpoint and restores on resume;
its helpers (guards, monitor, EMA, layout) read them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Epochs and steps done, the best validation accuracies and when, and the current epoch's metric sums."""

    epoch: int = 0              # epochs completed
    step: int = 0               # batches completed within the current epoch
    global_step: int = 0
    best_robust: float = -1.0
    best_epoch: int = -1
    best_ema_robust: float = -1.0
    best_ema_epoch: int = -1
    elapsed: float = 0.0        # training seconds so far, across resumes
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_sums: dict[str, Any] = field(default_factory=dict)  # metric sums over the current epoch's batches so far
