"""Guards of a training run: a non-finite loss or non-finite weights stop it with one line that says what
was kept, and no such weights are ever checkpointed."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..runtime import distributed
from ..runtime.distributed import DistInfo
from .progress import Progress


def check_weights(model: nn.Module, p: Progress, out: Path) -> None:
    """A step with a finite loss can still leave inf/NaN weights (a huge lr); never checkpoint those.
    `p` says where the run stands, `out` is its run folder (for the message)."""
    tensors = [w for w in model.state_dict().values() if w.is_floating_point()]
    if bool(torch.stack([torch.isfinite(w).all() for w in tensors]).all()):
        return
    where = f"epoch {p.epoch + 1}, step {p.step}" if p.step else f"the end of epoch {p.epoch}"
    raise UsageError(f"non-finite weights at {where}; training stopped, {kept(out)} (try a lower learning rate)")


def check_finite(bad_step: torch.Tensor, epoch: int, out: Path, dist: DistInfo) -> None:
    """Stop at the first non-finite loss of the epoch (`bad_step`: its index, or -1), of any rank, so every rank
    stops together; `out` is the run folder (for the message)."""
    if dist.enabled:
        never = torch.iinfo(torch.long).max
        first = distributed.all_reduce_(torch.where(bad_step < 0, never, bad_step), "min")
        bad_step = torch.where(first == never, -1, first)
    step = int(bad_step)
    if step >= 0:
        raise UsageError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}; training stopped, {kept(out)} "
                         "(try a lower learning rate)")


def kept(out: Path) -> str:
    """What a stopped run in folder `out` leaves behind, for its error message."""
    last = out / "checkpoints" / "last.safetensors"
    return (f"the last good checkpoint is kept in {last}" if last.exists()
            else "no checkpoint had been written yet (--checkpoint-every N saves within an epoch)")
