"""Images per second of training steps with each speed option ([speed] amp / layout / compile).

    PYTHONPATH=src:benchmarks python benchmarks/speed_options.py --device cuda   # results/speed_options.json

Same model, batch and initial weights for every option; each repeat times every option once (in a
rotating order), medians over repeats. Records the card's name on CUDA.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import environment, make_trainer, median, timed, write

OPTIONS = {"fp32": {}, "bf16": {"amp": "bf16"}, "bf16+channels_last": {"amp": "bf16", "layout": "channels_last"},
           "channels_last": {"layout": "channels_last"},
           "fp16": {"amp": "fp16"}, "compile": {"compile": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", nargs="*", default=["pgd-at", "iat"])
    p.add_argument("--options", nargs="*", default=["fp32", "bf16", "bf16+channels_last"], choices=list(OPTIONS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="speed_options")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        steppers = {}
        for name in args.options:
            torch.manual_seed(0)
            trainer, _ = make_trainer(method, args.model, args.batch_size, Path(tempfile.mkdtemp()),
                                      device=args.device, **OPTIONS[name])
            x, y = next(trainer.loader.batches(0))
            steppers[name] = (trainer, lambda t=trainer, x=x, y=y: t.train_step(x, y))
            steppers[name][1]()  # warm-up (and compilation)
        times = {n: [] for n in steppers}
        for r in range(args.repeats):
            names = list(steppers)
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(timed(steppers[n][1], steppers[n][0].device))
        base = median(times[args.options[0]])
        for n, ts in times.items():
            row = {"method": method, "option": n, "speed": OPTIONS[n], "median_s_per_step": median(ts),
                   "images_per_second": args.batch_size / median(ts), "speedup_vs_first": base / median(ts),
                   "seconds": ts}
            rows.append(row)
            print(f"{method:8s} {n:20s} {row['images_per_second']:8.2f} img/s  x{row['speedup_vs_first']:.2f}",
                  flush=True)
    device = steppers[args.options[0]][0].device
    path = write(args.out, {"benchmark": "speed_options", "environment": environment(device),
                            "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
