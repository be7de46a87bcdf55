"""Compute floor: time of one training step / time of the bare forward and backward passes it must do.

    PYTHONPATH=src:benchmarks python benchmarks/compute_floor.py     # -> benchmarks/results/compute_floor.json

The step is the trainer's own `train_step` (method loss, backward, after_backward, optimizer step) on a
fixed synthetic 3x32x32 batch. In the same run, on the same model and batch, we time the primitives:

    in_fb   forward + backward to the INPUT only (parameters frozen): one attack step
    in_f    the forward of in_fb alone (to price a backward without its forward)
    tr_fb   forward + backward to the parameters: one training pass (no optimizer step)
    opt     optimizer step (reported, NOT part of the floor)

and the passes each step must do (K = attack steps = 10):

    pgd-at     K in_fb + 1 tr_fb
    iat        2K in_fb + 2 tr_fb                  (x' and x~ each K steps; loss forwards both)
    uiat-fgsm  1 in_fb + 2 tr_fb + (in_fb - in_f)  (FGSM-RS; x' and x~ forwards; U's input-only backward)

ratio = step / floor. Each repeat times the step and every primitive back to back; the reported ratio
is the median of the per-repeat ratios (a shared machine's load drifts slowly); each primitive is
timed over --prim-calls calls. Target (issue 6): <= 1.10.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import environment, make_trainer, median, timed, write

PASSES = {  # method -> (in_fb, tr_fb, input-only backwards)
    "pgd-at": lambda k: (k, 1, 0),
    "iat": lambda k: (2 * k, 2, 0),
    "uiat-fgsm": lambda k: (1, 2, 1),
}


def primitives(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Closures for the bare passes, on the model in train mode (the methods' default BN mode)."""
    params = list(model.parameters())

    def in_fb() -> None:
        for p in params:
            p.requires_grad_(False)
        xd = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xd), y), xd)
        for p in params:
            p.requires_grad_(True)

    def in_f() -> None:
        for p in params:
            p.requires_grad_(False)
        F.cross_entropy(model(x.clone().requires_grad_(True)), y)
        for p in params:
            p.requires_grad_(True)

    def tr_fb() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return {"in_fb": in_fb, "in_f": in_f, "tr_fb": tr_fb}


def bench(model_name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    trainer, _ = make_trainer(method, model_name, args.batch_size[model_name], Path(tempfile.mkdtemp()),
                              steps=args.steps)
    x, y = next(trainer.loader.batches(0))
    prim = primitives(trainer.model, x, y)
    step = lambda: trainer.train_step(x, y)  # noqa: E731
    opt = trainer.optimizer.step
    step(), [f() for f in prim.values()]  # warm-up
    n_in, n_tr, n_bwd = PASSES[method](args.steps)
    rows = []
    for _ in range(args.repeats):
        t = {"step": timed(step, trainer.device)}
        t.update({k: timed(f, trainer.device, args.prim_calls) for k, f in prim.items()})
        t["opt"] = timed(opt, trainer.device)
        t["floor"] = n_in * t["in_fb"] + n_tr * t["tr_fb"] + n_bwd * max(t["in_fb"] - t["in_f"], 0.0)
        t["ratio"] = t["step"] / t["floor"]
        t["ratio_with_opt"] = t["step"] / (t["floor"] + t["opt"])
        rows.append(t)
    med = {k: median([r[k] for r in rows]) for k in rows[0]}
    print(f"{model_name:9s} {method:10s} step {med['step'] * 1e3:8.1f} ms  floor {med['floor'] * 1e3:8.1f} ms  "
          f"ratio {med['ratio']:.3f}  (with optimizer step in the floor {med['ratio_with_opt']:.3f})", flush=True)
    return {"model": model_name, "method": method, "batch_size": args.batch_size[model_name],
            "passes": {"input_grad_fwd_bwd": n_in, "train_fwd_bwd": n_tr, "input_only_bwd": n_bwd},
            "median": med, "repeats": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["cnn", "resnet18"])
    p.add_argument("--methods", nargs="*", default=list(PASSES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="repeats for cnn; resnet18 gets --repeats-big")
    p.add_argument("--repeats-big", type=int, default=2)
    p.add_argument("--prim-calls", type=int, default=3, help="calls per primitive timing (less noise)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="compute_floor")
    args = p.parse_args()
    args.batch_size = {"cnn": 128, "resnet18": 32}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for m in args.models:
        reps = args.repeats if m == "cnn" else args.repeats_big
        for method in args.methods:
            results.append(bench(m, method, argparse.Namespace(**{**vars(args), "repeats": reps})))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["note"] = "Trainer.train_step, fp32, no speed options, SGD; synthetic uniform-template data; seed 0"
    path = write(args.out, {"benchmark": "compute_floor", "target_ratio_max": 1.10,
                            "environment": environment(torch.device("cpu")), "config": config,
                            "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
