"""Attack throughput: our PGD-20 against torchattacks' PGD on the same model, inputs and threat model.

    pip install --no-deps torchattacks      # for this benchmark only; not a dependency of iat
    PYTHONPATH=src:benchmarks python benchmarks/attack_throughput.py   # -> results/attack_throughput.json

The model is a `cnn` trained for a few epochs on synthetic 3x32x32 data (so accuracy is neither 0 nor
100%), in eval mode for both attacks (torchattacks' default). l-inf eps 8/255 (--eps), step eps/4,
20 steps, uniform random start. At 8/255 this plainly trained model has 0% robust accuracy, so the
accuracy comparison is also run at --eps 1/255 (attack_throughput_eps1.json). Each repeat times both
attacks back to back in alternating order; medians over repeats. Target (issue 6): at least as fast,
robust accuracy within 0.5 points.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Optional

import torch

from common import environment, make_trainer, median, timed, write

from iat.attacks import PGD
from iat.values import parse_number


def load_torchattacks_pgd() -> tuple[Optional[type], str]:
    """torchattacks.PGD, and how it was loaded (or why it could not be)."""
    try:
        import torchattacks
        return torchattacks.PGD, f"torchattacks {torchattacks.__version__}, normal import"
    except ImportError as err:
        reason = f"`import torchattacks` fails ({err})"
    spec = importlib.util.find_spec("torchattacks")
    if spec is None or spec.origin is None:
        return None, "torchattacks is not installed (pip install --no-deps torchattacks)"
    # Its __init__ imports every attack, and one (TIFGSM) needs scipy. Load the unmodified PGD module
    # without running the package __init__ files.
    root = Path(spec.origin).parent
    for name, path in (("torchattacks", root), ("torchattacks.attacks", root / "attacks")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    from torchattacks.attacks.pgd import PGD as TAPGD
    version = next((line.split("=")[1].strip().strip("'\"") for line in (root / "__init__.py").read_text().splitlines()
                    if line.startswith("__version__")), "unknown")
    return TAPGD, f"torchattacks {version}, torchattacks/attacks/pgd.py loaded without the package __init__: {reason}"


def train_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    trainer, _ = make_trainer("standard", args.model, 128, Path(tempfile.mkdtemp()), steps=1)
    from iat.data import load_dataset

    bundle = load_dataset("synthetic", n_train=2048, n_test=args.n, num_classes=10, channels=3, size=32)
    trainer.cfg.optim.epochs = args.train_epochs
    trainer.bundle = bundle
    for epoch in range(args.train_epochs):  # a few plain epochs, directly on the loader (no validation)
        for x, y in trainer.loader.batches(epoch):
            trainer.train_step(x, y)
    model = trainer.model.eval()
    return model, bundle.test.x.float().div(255), bundle.test.y


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        return float(sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum() for i in range(0, len(x), batch))
                     / len(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--n", type=int, default=512, help="test examples attacked")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eps", default="8/255", help="l-inf radius; step size eps/4 (2/255 at 8/255)")
    p.add_argument("--out", default="attack_throughput")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    TAPGD, how = load_torchattacks_pgd()
    model, x, y = train_model(args)
    eps = parse_number(args.eps, "--eps")
    alpha, steps = eps / 4, 20
    ours = PGD(eps=eps, step_size=alpha, steps=steps, bn_mode="eval")
    attacks = {"iat.PGD": lambda xb, yb: ours(model, xb, yb)}
    if TAPGD is not None:
        theirs = TAPGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        attacks["torchattacks.PGD"] = lambda xb, yb: theirs(xb, yb)

    def run(name: str) -> torch.Tensor:
        return torch.cat([attacks[name](x[i:i + args.batch_size], y[i:i + args.batch_size])
                          for i in range(0, len(x), args.batch_size)])

    times: dict[str, list[float]] = {k: [] for k in attacks}
    acc: dict[str, list[float]] = {k: [] for k in attacks}
    for r in range(args.repeats):
        for name in (list(attacks) if r % 2 == 0 else list(attacks)[::-1]):
            out: list[torch.Tensor] = []
            times[name].append(timed(lambda: out.append(run(name)), device))
            x_adv = out[0]
            assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
            acc[name].append(accuracy(model, x_adv, y, args.batch_size))
    summary = {k: {"median_seconds": median(times[k]), "images_per_second": len(x) / median(times[k]),
                   "robust_accuracy_median": median(acc[k]), "seconds": times[k], "robust_accuracy": acc[k]}
               for k in attacks}
    for k, s in summary.items():
        print(f"{k:18s} {s['images_per_second']:8.1f} img/s   robust acc {s['robust_accuracy_median']:.2%}")
    comparison = None
    if TAPGD is not None:
        a, b = summary["iat.PGD"], summary["torchattacks.PGD"]
        pairs = sorted(t / o for o, t in zip(times["iat.PGD"], times["torchattacks.PGD"]))  # one per repeat
        comparison = {"speed_ratio_ours_over_theirs": a["images_per_second"] / b["images_per_second"],
                      "pair_speed_ratios": pairs, "pair_speed_ratio_median": median(pairs),
                      "accuracy_gap_points": 100 * (a["robust_accuracy_median"] - b["robust_accuracy_median"])}
        comparison["target_met"] = (comparison["pair_speed_ratio_median"] >= 1.0
                                    and abs(comparison["accuracy_gap_points"]) <= 0.5)
        print(comparison)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(eps=eps, step_size=alpha, steps=steps, norm="linf", random_start=True, model_mode="eval")
    path = write(args.out, {"benchmark": "attack_throughput", "torchattacks": how, "environment": environment(device),
                            "config": config, "natural_accuracy": accuracy(model, x, y, args.batch_size),
                            "results": summary, "comparison": comparison})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
