"""What each speed option costs in robustness: models trained with and without it, all attacked in fp32.

    PYTHONPATH=src:benchmarks python benchmarks/speed_option_strength.py          # results/speed_option_strength.json
    PYTHONPATH=src:benchmarks python benchmarks/speed_option_strength.py --device cuda --model resnet18 \\
        --dataset cifar10 --eps 8/255 --step-size 2/255 --val-size 40000 --epochs 5

Each option trains the same recipe from the same seeds on real data through `iat train` (the option set
with --set speed.*), then `iat eval` measures natural and PGD-20 accuracy of the result in fp32 (eval never
uses the training run's speed options). The seed-to-seed spread of the fp32 baseline is recorded too: an
option's effect is only visible if it is larger than that spread. Training seconds per option come from
the runs' own metrics (same machine, same run of this script).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import environment, write

# every option names its layout and compile: the defaults ("auto") would pick them by timing
EAGER = ["speed.compile=false"]
OPTIONS = {"fp32": ["speed.layout=nchw", *EAGER], "bf16": ["speed.amp=bf16", "speed.layout=nchw", *EAGER],
           "fp16": ["speed.amp=fp16", "speed.layout=nchw", *EAGER],
           "channels_last": ["speed.layout=channels_last", *EAGER], "compile": ["speed.compile=true", "speed.layout=nchw"]}


def iat(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "iat", *argv], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", nargs="*", default=["fp32", "bf16", "channels_last"], choices=list(OPTIONS))
    p.add_argument("--method", default="pgd-at")
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--eps", default="0.1")
    p.add_argument("--step-size", default="0.025")
    p.add_argument("--steps", default="5")
    p.add_argument("--epochs", default="2")
    p.add_argument("--val-size", default="58000", help="held out of training (2,000 Fashion-MNIST images train)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--n-examples", default="1000")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="speed_option_strength")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for option in args.options:
                run = Path(tmp) / f"{option}-{seed}"
                sets = [a for s in OPTIONS[option] for a in ("--set", s)]
                iat("train", "--method", args.method, "--model", args.model, "--dataset", args.dataset,
                    "--eps", args.eps, "--step-size", args.step_size, "--steps", args.steps, "--epochs", args.epochs,
                    "--val-size", args.val_size, "--seed", str(seed), "--device", args.device, "--no-progress",
                    "--out", str(run), *sets)
                iat("eval", str(run), "--checkpoint", "last", "--attacks", "natural,pgd20", "--n-examples",
                    args.n_examples, "--device", args.device, "--no-progress")
                result = json.loads((run / "eval-last.json").read_text())
                acc = {r["attack"]: r["accuracy"] for r in result["results"]}
                records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                row = {"option": option, "seed": seed, "natural": acc["natural"], "pgd20": acc["pgd20"],
                       "train_seconds": sum(r["epoch_seconds"] for r in records),
                       "speed": json.loads((run / "config.json").read_text())["config"]["speed"],
                       "pgd20_protocol": next(r["protocol"] for r in result["results"] if r["attack"] == "pgd20")}
                rows.append(row)
                print(f"seed {seed} {option:14s} natural {row['natural']:.2%}  pgd20 {row['pgd20']:.2%}  "
                      f"train {row['train_seconds']:.0f}s", flush=True)
    summary = {}
    for option in args.options:
        mine = [r for r in rows if r["option"] == option]
        base = {r["seed"]: r for r in rows if r["option"] == args.options[0]}
        summary[option] = {
            "natural_mean": statistics.mean(r["natural"] for r in mine),
            "pgd20_mean": statistics.mean(r["pgd20"] for r in mine),
            "pgd20_minus_first_option_per_seed": {r["seed"]: r["pgd20"] - base[r["seed"]]["pgd20"] for r in mine},
            "train_seconds_ratio_to_first": statistics.mean(r["train_seconds"] / base[r["seed"]]["train_seconds"]
                                                            for r in mine)}
    first = [r["pgd20"] for r in rows if r["option"] == args.options[0]]
    summary["seed_spread_of_first_option_pgd20"] = max(first) - min(first)
    path = write(args.out, {"benchmark": "speed_option_strength", "environment": environment(torch.device(args.device)),
                            "config": {k: v for k, v in vars(args).items() if k != "out"},
                            "results": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
