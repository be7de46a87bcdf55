"""Distributed data parallel training through PyTorch's own engine (torchrun + DistributedDataParallel).

    torchrun --nproc_per_node 2 -m iat train ...          # one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST ... -m iat train ...   # several nodes

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` reads them and joins the process group (gloo on
CPU, nccl on CUDA). optim.batch_size stays the GLOBAL batch: each of W ranks takes batch_size / W of
it, so a run's arithmetic does not depend on how many processes run it (up to floating-point order).
Random starts of attacks are drawn for the global batch and sliced per rank (`training/step.py: sharded_noise`), so two
ranks of batch B craft exactly the examples one process of batch 2B crafts. BatchNorm statistics are
per rank unless distributed.sync_bn (--sync-bn) makes them those of the global batch (sync_bn.py).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError
from .sync_bn import convert as convert_sync_bn


@dataclass(frozen=True)
class DistInfo:
    """A process's place in the run: its global rank, the number of processes, its rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether this is a multi-process run (world_size > 1)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None


def info() -> DistInfo:
    """This process's place: from the process group when one is up, else single-process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return DistInfo()


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (a no-op without WORLD_SIZE > 1, or if already joined).

    Returns the rank info and the device this rank uses (cuda:LOCAL_RANK for CUDA runs).
    """
    world = _env_int("WORLD_SIZE", 1)
    if not dist.is_initialized() and world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend=backend)
        atexit.register(cleanup)
    me = info()
    if me.enabled and device.type == "cuda":
        device = torch.device("cuda", me.local_rank)
    return me, device


def cleanup() -> None:
    """Leave the process group, if one is up (registered at exit by `setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if info().enabled:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place sum / max / min over ranks (identity in a single process); returns the tensor."""
    if info().enabled:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def wrap(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the model in a multi-process run; the model itself otherwise.

    Only the training forward and backward go through the wrapper (gradients averaged over ranks,
    buffers broadcast from rank 0); the attack engine unwraps it to craft on the bare module. With
    sync_bn, the model's BatchNorm layers first become global-batch ones, in place (`sync_bn.convert`).
    """
    if not info().enabled:
        return model
    if sync_bn:
        convert_sync_bn(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value averaged over ranks, in one all-reduce (ranks hold equal batch counts and sizes)."""
    me = info()
    if not me.enabled or not values:
        return values
    keys = list(values)  # the same insertion order on every rank (the same code ran)
    stacked = torch.stack([torch.as_tensor(values[k]).float() for k in keys])
    all_reduce_(stacked)
    return {k: v / me.world_size for k, v in zip(keys, stacked, strict=True)}


def from_main(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Rank 0's numbers on every rank (so decisions such as 'new best checkpoint' never diverge)."""
    if not info().enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return {**values, **{k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}}
