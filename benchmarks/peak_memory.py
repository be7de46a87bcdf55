"""Peak memory of one training step per method (each in a fresh process, so peaks do not mix).

    PYTHONPATH=src:benchmarks python benchmarks/peak_memory.py     # -> benchmarks/results/peak_memory.json

CPU: the process's peak resident set (getrusage ru_maxrss) after building the trainer (model, data,
optimizer) and after one Trainer.train_step; the step's cost is the growth. CUDA: torch.cuda
max_memory_allocated over the step (allocator bytes, not process RSS). RSS is a coarse measure (the
allocator keeps freed pages), so compare methods against each other, not across machines.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import environment, make_trainer, write

MiB = 2**20


def one(method: str, model: str, batch: int, device: str) -> dict[str, Any]:
    """Runs inside the child process."""
    torch.set_num_threads(1)
    trainer, _ = make_trainer(method, model, batch, Path(tempfile.mkdtemp()), device=device)
    x, y = next(trainer.loader.batches(0))
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.train_step(x, y)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"method": method, "model": model, "batch_size": batch, "rss_peak_before_step_mib": before / MiB,
           "rss_peak_after_step_mib": after / MiB, "step_rss_growth_mib": (after - before) / MiB}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        row["cuda_peak_over_step_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / MiB
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=4, metavar=("METHOD", "MODEL", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="*", default=["cnn:128", "resnet18:32"], help="MODEL:BATCH")
    p.add_argument("--methods", nargs="*", default=["standard", "fgsm-rs", "uiat-fgsm", "pgd-at", "trades", "iat"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="peak_memory")
    args = p.parse_args()
    if args.one:
        method, model, batch, device = args.one
        print(json.dumps(one(method, model, int(batch), device)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for spec in args.models:
        model, batch = spec.split(":")
        for method in args.methods:
            done = subprocess.run([sys.executable, __file__, "--one", method, model, batch, args.device],
                                  env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model:9s} {method:10s} peak RSS {r['rss_peak_after_step_mib']:8.1f} MiB  "
                  f"(+{r['step_rss_growth_mib']:.1f} MiB over the step)", flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "one")}
    config["note"] = "fp32, no speed options, threat PGD-10 eps 8/255; synthetic 3x32x32 data; one step, no warm-up"
    path = write(args.out, {"benchmark": "peak_memory", "environment": environment(torch.device(args.device)),
                            "config": config, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
