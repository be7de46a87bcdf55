"""Optional TensorBoard event files of a training run (`--tensorboard`, `pip install "iat[tensorboard]"`).

Written with torch.utils.tensorboard into RUN/tensorboard/, by rank 0 alone, every scalar on the
global-step axis (the batches trained so far, counted in global batches):

    train_step/<metric>   every `tensorboard_every` batches: that batch's metric (loss, ...), averaged over ranks
    train/<metric>        each epoch's training means (as metrics.jsonl's `train`)
    val/natural, val/robust, val/fgsm, lr    each epoch's validation accuracies and learning rate

at the step that ends the epoch. Event files are append-only: a resumed run opens a new file with
purge_step = the checkpoint's step + 1, so TensorBoard hides what the killed run logged after the
checkpoint it resumed from and shows one continuous curve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UsageError
from ..records import MetricLine
from ..runtime import distributed

INSTALL = 'pip install "iat[tensorboard]"'


def _summary_writer() -> type:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it and says so less plainly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package; {INSTALL}") from None
    return SummaryWriter


class Board:
    """The run's TensorBoard writer, or a no-op when --tensorboard is off; every rank calls every method."""

    def __init__(self, cfg: Any, out: Path, is_main: bool) -> None:
        self.enabled, self.every = bool(cfg.tensorboard), cfg.tensorboard_every
        self.is_main, self.folder = is_main, Path(out) / "tensorboard"
        self._writer_cls = _summary_writer() if self.enabled else None  # a missing package fails before training
        self.writer: Optional[Any] = None

    def open(self, resumed_at: int) -> None:
        """Start writing (at the start of fit); resumed_at: the global step of the checkpoint resumed from."""
        if self.enabled and self.is_main and self.writer is None:
            assert self._writer_cls is not None
            purge = resumed_at + 1 if resumed_at > 0 else None
            self.writer = self._writer_cls(log_dir=str(self.folder), purge_step=purge)

    def step(self, global_step: int, metrics: dict[str, torch.Tensor]) -> None:
        """After a training batch: every `every` batches, its metrics (averaged over ranks, a collective)."""
        if not self.enabled or global_step % self.every:
            return
        values = distributed.rank_mean(metrics)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train_step/{key}", float(value), global_step)

    def epoch(self, global_step: int, line: MetricLine) -> None:
        """After an epoch's metric line: the same numbers metrics.jsonl holds."""
        if self.writer is None:
            return
        scalars: dict[str, Optional[float]] = {f"train/{k}": v for k, v in line.train.items()}
        scalars.update({"val/natural": line.val_natural, "val/robust": line.val_robust, "val/fgsm": line.val_fgsm,
                        "lr": line.lr, "val/natural_ema": line.val_natural_ema, "val/robust_ema": line.val_robust_ema})
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), global_step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (at the end of fit); a later `open` starts a new one."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
