"""`iat eval`: robust accuracy of a checkpoint on the test split, with the protocol next to each number."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .attacks import PGD, create_attack
from .checkpoint import atomic_write_text
from .data import load_dataset
from .evaluate import robust_accuracy
from .registry import UsageError
from .runs import checkpoint_path, load_model
from .runtime import resolve_device
from .units import parse_number


def build_attacks(names: str, eps: float, norm: str, restarts: int) -> dict[str, Any]:
    attacks = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        attack = create_attack(name, eps=eps, norm=norm) if name != "natural" else create_attack(name)
        if isinstance(attack, PGD) and attack.random_start and restarts > 1:
            attack = dataclasses.replace(attack, restarts=restarts)
        attacks[name] = attack
    if not attacks:
        raise UsageError("--attacks is empty; e.g. --attacks natural,pgd20")
    return attacks


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'attack':<12}{'accuracy':>9}  {'eps':>8}  {'norm':<5}{'steps':>6}  {'step size':>9}  {'restarts':>8}  loss"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["protocol"]
        eps = f"{p['eps']:.4f}" if "eps" in p and r["attack"] != "natural" else "-"
        step = f"{p['step_size']:.4f}" if "step_size" in p else "-"
        lines.append(f"{r['attack']:<12}{r['accuracy']:>9.2%}  {eps:>8}  {p.get('norm', '-'):<5}"
                     f"{p.get('steps', '-'):>6}  {step:>9}  {p.get('restarts', '-'):>8}  {p.get('loss', '-')}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    path = checkpoint_path(args.target, args.checkpoint)
    device = resolve_device(args.device)
    model, state = load_model(path, device)
    resolved = state["resolved"]
    train_cfg = resolved["config"]
    eps = parse_number(args.eps, "--eps") if args.eps is not None else train_cfg["threat"]["eps"]
    norm = args.norm or train_cfg["threat"]["norm"]
    attacks = build_attacks(args.attacks, eps, norm, args.restarts)
    data_name = args.dataset or train_cfg["data"]["name"]
    bundle = load_dataset(data_name, args.data_dir or train_cfg["data"]["root"])
    test = bundle.test
    n = len(test) if args.n_examples is None else args.n_examples
    if not 0 < n <= len(test):
        raise UsageError(f"--n-examples must be between 1 and {len(test)}, got {n}")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    acc = robust_accuracy(model, test.x[:n], test.y[:n], attacks, batch_size=args.batch_size,
                          progress=not args.no_progress, desc="eval")
    seconds = time.perf_counter() - t0
    rows = [{"attack": k, "accuracy": v / n, "correct": v, "protocol": attacks[k].describe()}
            for k, v in acc.correct.items()]
    rows.append({"attack": "worst case", "accuracy": acc.worst_case / n, "correct": acc.worst_case,
                 "protocol": {"per_example_worst_case_of": list(attacks)}})
    result = {"checkpoint": str(path), "checkpoint_kind": args.checkpoint,
              "checkpoint_epoch": state.get("progress", {}).get("epoch"),
              "data": {"name": bundle.name, "source": bundle.source, "split": "test", "n_examples": n},
              "model": resolved["model"], "method": resolved["method"], "seed": args.seed,
              "device": str(device), "seconds": seconds, "results": rows}
    out = Path(args.out) if args.out else _default_out(args.target, path, args.checkpoint)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{path} (epoch {result['checkpoint_epoch']}) on {bundle.source}, test split, {n} examples:")
    print(format_table(rows))
    print(f"results: {out}  ({seconds:.0f}s)")
    return 0


def _default_out(target: str, path: Path, which: str) -> Path:
    base = Path(target)
    return base / f"eval-{which}.json" if base.is_dir() else path.with_suffix(".eval.json")
