"""Distributed data parallel training through PyTorch's own engine (DistributedDataParallel), under torchrun
or SLURM's srun.

    torchrun --nproc_per_node 2 -m iat train ...          # one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST ... -m iat train ...   # several nodes
    srun --ntasks 8 --ntasks-per-node 4 iat train ...     # SLURM, without torchrun

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` reads them and joins the process group (gloo on
CPU, nccl on CUDA). A task of a SLURM job step that torchrun did not start gets the same variables from
SLURM's (`slurm_env`), written into its environment, so the whole process sees one place.
optim.batch_size stays the GLOBAL batch: each of W ranks takes batch_size / W of
it, so a run's arithmetic does not depend on how many processes run it (up to floating-point order).
Random starts of attacks are drawn for the global batch and sliced per rank (`training/step.py: sharded_noise`), so two
ranks of batch B craft exactly the examples one process of batch 2B crafts. BatchNorm statistics are
per rank unless distributed.sync_bn (--sync-bn) makes them those of the global batch (sync_bn.py).
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
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


def _env_int(name: str, default: int, env: Mapping[str, str] = os.environ, low: int = 0) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None
    if number < low:
        raise UsageError(f"environment variable {name} must be an integer >= {low}, got {value!r}")
    return number


TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launch_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as its launcher set it (torchrun's RANK, or srun's SLURM_PROCID in a multi-task
    step), before any process group exists; 0 when it cannot be read (so errors about it are still printed)."""
    try:
        return int(env.get("RANK") or slurm_env(env).get("RANK") or 0)
    except (ValueError, UsageError):
        return 0


def launch_local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank on its node as its launcher set it (torchrun's LOCAL_RANK, or srun's SLURM_LOCALID in a
    multi-task step); 0 when it cannot be read."""
    try:
        return int(env.get("LOCAL_RANK") or slurm_env(env).get("LOCAL_RANK") or 0)
    except (ValueError, UsageError):
        return 0


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), read from SLURM's
    for a task of a job step of SLURM_NTASKS > 1; {} otherwise, and whenever any of torchrun's is set (they win).

    Only a job step's tasks (srun: SLURM_STEP_ID) count: a batch script sees SLURM_NTASKS of its whole allocation
    but runs once. MASTER_ADDR (unless set) is the step's first host; MASTER_PORT (unless set) is
    20000 + SLURM_JOB_ID % 20000, the same for every task of the job (set it for two multi-task steps at once).
    """
    if any(name in env for name in TORCHRUN) or "SLURM_PROCID" not in env:
        return {}
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return {}
    world = _env_int("SLURM_NTASKS", 1, env, low=1)
    if world == 1:
        return {}
    rank = _env_int("SLURM_PROCID", 0, env)
    if rank >= world:
        raise UsageError(f"SLURM_PROCID={rank} must be below SLURM_NTASKS={world}")
    if env.get("MASTER_PORT") is not None:
        port = _env_int("MASTER_PORT", 0, env, low=1)
        if port > 65535:
            raise UsageError(f"environment variable MASTER_PORT must be a TCP port (1 to 65535), got {port}")
    elif env.get("SLURM_JOB_ID") is not None:
        port = 20000 + _env_int("SLURM_JOB_ID", 0, env) % 20000
    else:
        raise UsageError("SLURM_JOB_ID is not set, so no MASTER_PORT can be derived from it: set MASTER_PORT")
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(_env_int("SLURM_LOCALID", 0, env)),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env), "MASTER_PORT": str(port)}


def first_host(env: Mapping[str, str]) -> str:
    """The first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST), expanded by `scontrol show hostnames` when
    scontrol is on PATH, else by `expand_hostlist`."""
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "").strip()
    if not nodelist:
        raise UsageError("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: set MASTER_ADDR")
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=30, check=False)
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass  # the parser below reads the same syntax
    return expand_hostlist(nodelist)[0]


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

    A range keeps the width of its first number (zero-padded); several bracket groups in one name multiply out
    ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2). Anything else is a one-line UsageError.
    """
    bad = UsageError(f"cannot read the SLURM host list {nodelist!r} (expected names like node[01-03,07],gpu5)")
    names = re.findall(r"(?:[^,\[\]]|\[[^\[\]]*\])+", nodelist)
    if not nodelist or ",".join(names) != nodelist:  # an empty name, or a stray or nested bracket
        raise bad
    hosts = []
    for name in names:
        pieces = re.split(r"\[([^\[\]]*)\]", name)  # literal, bracket, literal, ...
        choices = [[piece] if i % 2 == 0 else _expand_ranges(piece, bad) for i, piece in enumerate(pieces)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges: str, bad: UsageError) -> list[str]:
    """"01-03,07" -> 01 02 03 07."""
    out = []
    for item in ranges.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise bad
        low, high = match[1], match[2] or match[1]
        out += [f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)]
    return out


def info() -> DistInfo:
    """This process's place: from the process group when one is up, else single-process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return DistInfo()


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun (or SLURM's srun) describes: a no-op without WORLD_SIZE > 1, or if joined.

    Returns the rank info and the device this rank uses (cuda:LOCAL_RANK for CUDA runs, `cuda_index`).
    """
    from_slurm = slurm_env(os.environ)
    os.environ.update(from_slurm)  # torchrun's variables, so every reader of them sees the same place
    if from_slurm and "OMP_NUM_THREADS" not in os.environ and "SLURM_CPUS_PER_TASK" in os.environ:
        torch.set_num_threads(_env_int("SLURM_CPUS_PER_TASK", 1, low=1))  # the task's CPUs, not the node's
    world = _env_int("WORLD_SIZE", 1)
    if not dist.is_initialized() and world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(cuda_index(_env_int("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        atexit.register(cleanup)
    me = info()
    if me.enabled and device.type == "cuda":
        device = torch.device("cuda", cuda_index(me.local_rank))
    return me, device


def cuda_index(local_rank: int) -> int:
    """The GPU of the rank with this local rank: its own, counted among the GPUs this process sees (a task that
    sees only its own GPU, as under srun --gpus-per-task 1, has it as cuda:0)."""
    return local_rank % max(torch.cuda.device_count(), 1)


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
