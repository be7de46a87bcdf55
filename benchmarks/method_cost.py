"""Time per training step of every registered method, relative to pgd-at and fgsm-rs.

    PYTHONPATH=src python benchmarks/method_cost.py            # writes benchmarks/results/method_cost.json

A training step is what the trainer runs: method.step_context, loss, zero_grad, backward,
after_backward, optimizer step. Same model (cnn4), same synthetic 3x32x32 batch, same initial weights
for every method. Machines are shared, so (1) every repeat times every method in a fresh random order
(interleaved, drift hits all alike), medians over repeats; (2) the target ratio uiat-fgsm / fgsm-rs
is also measured in back-to-back pairs (the median of per-pair ratios cancels slow load changes);
(3) the model forwards per step are counted too: a cost measure no other process can disturb.
Target (docs/METHOD.md): uiat-fgsm at most 10% more time per step than fgsm-rs.

    PYTHONPATH=src:benchmarks python benchmarks/method_cost.py --paired-models cnn:128 resnet18:16

measures only the interleaved pairs (uiat-fgsm start=inverse, inverse-noise and random against fgsm-rs, same model,
same batch, the order inside a pair alternating) on each MODEL:BATCH, and adds them to the JSON under
"paired_by_model", keeping what it already holds for the other methods.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common import cpu_name
from iat.methods import METHODS, create_method
from iat.models import create_model

# Extra entries besides the registered recipes: name -> (recipe, options), to split uiat's cost.
VARIANTS = {"uiat-fgsm[detach_inverse]": ("uiat-fgsm", {"detach_inverse": True}),
            "uiat-fgsm[inverse_grad=kl]": ("uiat-fgsm", {"inverse_grad": "kl"}),
            "uiat-fgsm[start=inverse]": ("uiat-fgsm", {"start": "inverse"}),
            "uiat-fgsm[start=inverse-noise]": ("uiat-fgsm", {"start": "inverse-noise"})}
FOCUS = ["fgsm-rs", "uiat-fgsm", "uiat-fgsm[detach_inverse]", "uiat-fgsm[inverse_grad=kl]", "uiat-fgsm[start=inverse]",
         "uiat-fgsm[start=inverse-noise]"]
PAIRED = ["uiat-fgsm[start=inverse]", "uiat-fgsm[start=inverse-noise]", "uiat-fgsm"]  # --paired-models: each against fgsm-rs
TARGET = 1.10


def new_model(name: str, classes: int) -> torch.nn.Module:
    return create_model(name, num_classes=classes, in_channels=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3)


def make_stepper(entry: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
                 init: dict[str, torch.Tensor], model_name: str = "") -> tuple[Callable[[], None], list[int]]:
    """A closure running one training step of `entry`, and a counter of the model's forwards."""
    recipe, options = VARIANTS.get(entry, (entry, {}))
    method = create_method(recipe, eps=args.eps, step_size=args.eps / 4, steps=args.steps, **options)
    model = new_model(model_name or args.model, args.classes)
    model.load_state_dict(init)
    model.train()
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with method.step_context(model):
            loss, _ = method.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(model)
            opt.step()

    return step, forwards


def time_steps(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def batch_and_weights(args: argparse.Namespace, model_name: str, batch_size: int) -> tuple:
    """The seeded CIFAR-sized batch and the initial weights every entry's model starts from."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, args.classes, (batch_size,), generator=g)
    return x, y, new_model(model_name, args.classes).state_dict()


def warm_up(steppers: dict[str, Any]) -> dict[str, int]:
    """Two steps of every entry (warm-up); returns the forward passes the second one made."""
    forwards = {}
    for e, (step, count) in steppers.items():
        step()
        count[0] = 0
        step()
        forwards[e] = count[0]
    return forwards


def measure(args: argparse.Namespace) -> dict[str, Any]:
    x, y, init = batch_and_weights(args, args.model, args.batch_size)
    entries = (args.methods or METHODS.names()) + [v for v in VARIANTS if not args.methods]
    steppers = {e: make_stepper(e, args, x, y, init) for e in entries}
    forwards = warm_up(steppers)
    order, samples = random.Random(args.seed), {e: [] for e in entries}
    for r in range(args.repeats):
        for e in order.sample(entries, len(entries)):
            samples[e].append(time_steps(steppers[e][0], args.steps_per_repeat))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    pairs = {e: [] for e in FOCUS[1:] if e in steppers}
    for _ in range(args.pair_repeats if "fgsm-rs" in steppers else 0):
        for e in pairs:
            base = time_steps(steppers["fgsm-rs"][0], args.steps_per_repeat)
            pairs[e].append(time_steps(steppers[e][0], args.steps_per_repeat) / base)
    return {"samples": samples, "forwards": forwards, "pairs": pairs}


def measure_pairs(args: argparse.Namespace, model_name: str, batch_size: int) -> dict[str, Any]:
    """Interleaved pairs on one model and batch: per pair, fgsm-rs and the entry back to back (which one
    runs first alternates), ratio entry / fgsm-rs; every entry's model starts from the same weights."""
    x, y, init = batch_and_weights(args, model_name, batch_size)
    entries = ["fgsm-rs"] + PAIRED
    steppers = {e: make_stepper(e, args, x, y, init, model_name) for e in entries}
    forwards = warm_up(steppers)
    ratios, base_s = {e: [] for e in PAIRED}, []
    t0, load0 = time.time(), os.getloadavg()
    for r in range(args.pair_repeats):
        for e in PAIRED:
            first, second = (steppers["fgsm-rs"][0], steppers[e][0])[::1 if r % 2 == 0 else -1]
            a, b = time_steps(first, args.steps_per_repeat), time_steps(second, args.steps_per_repeat)
            base, other = (a, b) if r % 2 == 0 else (b, a)
            ratios[e].append(other / base)
            base_s.append(base)
        print(f"{model_name}: pair {r + 1}/{args.pair_repeats} done", flush=True)
    pairs = {e: {"median_ratio_vs_fgsm_rs": statistics.median(v), "min": min(v), "max": max(v), "ratios": v,
                 "met": statistics.median(v) <= TARGET if e == PAIRED[0] else None} for e, v in ratios.items()}
    return {"model": model_name, "batch_size": batch_size, "pairs": pairs, "model_forwards_per_step": forwards,
            "fgsm_rs_median_s_per_step": statistics.median(base_s), "pair_repeats": args.pair_repeats,
            "steps_per_timing": args.steps_per_repeat, "load_average_start": load0,
            "load_average_end": os.getloadavg(), "wall_seconds": time.time() - t0}


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": "cpu",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def paired_main(args: argparse.Namespace) -> None:
    """--paired-models: add the per-model pairs to the JSON, keeping its other content."""
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    by_model = result.setdefault("paired_by_model", {})
    for spec in args.paired_models:
        name, batch = spec.split(":")
        m = measure_pairs(args, name, int(batch))
        m["environment"], m["config"] = environment(), {"eps": args.eps, "classes": args.classes, "seed": args.seed,
                                                        "optimizer": "sgd lr 0.01 momentum 0.9 wd 5e-4",
                                                        "data": "synthetic uniform", "input_shape": [3, 32, 32]}
        by_model[f"{name} (batch {batch})"] = m
        for e, r in m["pairs"].items():
            print(f"{name} batch {batch}: {e:26s} x{r['median_ratio_vs_fgsm_rs']:.3f} fgsm-rs "
                  f"(min {r['min']:.3f}, max {r['max']:.3f}), forwards {m['model_forwards_per_step'][e]}")
    result["target_start_inverse"] = {
        "entry": PAIRED[0], "max_ratio_vs_fgsm_rs": TARGET,
        "median_ratio": {k: v["pairs"][PAIRED[0]]["median_ratio_vs_fgsm_rs"] for k, v in by_model.items()},
        "met": all(v["pairs"][PAIRED[0]]["met"] for v in by_model.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    med = {e: statistics.median(s) for e, s in m["samples"].items()}
    rel = lambda e, ref: med[e] / med[ref] if ref in med else None  # noqa: E731
    methods = {e: {"median_s_per_step": med[e], "vs_pgd_at": rel(e, "pgd-at"), "vs_fgsm_rs": rel(e, "fgsm-rs"),
                   "model_forwards_per_step": m["forwards"][e], "samples_s_per_step": m["samples"][e]}
               for e in sorted(med, key=med.get)}
    paired = {e: {"median_ratio_vs_fgsm_rs": statistics.median(r), "ratios": r} for e, r in m["pairs"].items() if r}
    return {"methods": methods, "paired_vs_fgsm_rs": paired}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--steps", type=int, default=10, help="attack steps of the multi-step methods (PGD-10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps-per-repeat", type=int, default=2)
    p.add_argument("--pair-repeats", type=int, default=15, help="back-to-back fgsm-rs / uiat-fgsm pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", help="default: every registered method plus the uiat variants")
    p.add_argument("--paired-models", nargs="*", metavar="MODEL:BATCH",
                   help="only the interleaved pairs of uiat-fgsm (start=inverse, inverse-noise, random) vs fgsm-rs per model")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.paired_models:
        return paired_main(args)
    load0, t0 = os.getloadavg(), time.time()
    result = summarise(measure(args))
    uiat = result["methods"].get("uiat-fgsm", {})
    pair = result["paired_vs_fgsm_rs"].get("uiat-fgsm", {})
    result["target"] = {"uiat_fgsm_over_fgsm_rs_max": 1.10, "median_ratio": uiat.get("vs_fgsm_rs"),
                        "paired_median_ratio": pair.get("median_ratio_vs_fgsm_rs"),
                        "met": pair.get("median_ratio_vs_fgsm_rs", 9.0) <= 1.10}
    result["environment"] = environment() | {"load_average_start": load0, "load_average_end": os.getloadavg(),
                                             "wall_seconds": time.time() - t0}
    result["config"] = {k: v for k, v in vars(args).items() if k != "out"} | {
        "input_shape": [3, 32, 32], "optimizer": "sgd lr 0.01 momentum 0.9 wd 5e-4", "data": "synthetic uniform",
        "note": "method defaults, threat eps/step eps/4/steps as above; single-step recipes ignore step and steps"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for e, r in result["methods"].items():
        print(f"{e:28s} {r['median_s_per_step'] * 1e3:9.1f} ms/step  x{r['vs_pgd_at'] or 0:5.2f} pgd-at  "
              f"x{r['vs_fgsm_rs'] or 0:5.2f} fgsm-rs  {r['model_forwards_per_step']} forwards")
    for e, r in result["paired_vs_fgsm_rs"].items():
        print(f"paired {e:28s} x{r['median_ratio_vs_fgsm_rs']:.3f} fgsm-rs")


if __name__ == "__main__":
    main()
