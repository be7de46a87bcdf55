"""Command line: `iat train`, `iat eval`, `iat list`, `iat data fetch`.

Bad input ends with a one-line message on stderr and exit status 2 (a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import config as C
from .registry import UsageError

# Flags of `iat train` -> dotted config keys. A config file sets the same keys; flags win.
TRAIN_FLAGS = {
    "method": "method", "model": "model", "dataset": "data.name", "data_dir": "data.root",
    "val_size": "data.val_size", "augment": "data.augment", "epochs": "optim.epochs",
    "batch_size": "optim.batch_size", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "schedule": "optim.schedule", "eps": "threat.eps", "step_size": "threat.step_size",
    "steps": "threat.steps", "norm": "threat.norm", "bn_mode": "threat.bn_mode",
    "val_examples": "val.n_examples", "val_steps": "val.steps", "seed": "seed", "device": "device",
    "checkpoint_every": "checkpoint_every_steps",
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; RUN_DIR gets config.json, metrics.jsonl, checkpoints/")
    p.add_argument("--config", help="TOML or JSON file with the same keys as config.json's 'config'")
    p.add_argument("--out", required=True, help="run directory")
    for flag in TRAIN_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, metavar=flag.split("_")[-1].upper())
    p.add_argument("--beta", default=None, help="weight of the method's regulariser (method option beta)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -O eps_inv=4/255 -O kl_direction=inv||adv")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key by dotted path, e.g. --set optim.momentum=0.9")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run that already exists in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the test split")
    p.add_argument("target", help="RUN_DIR or a .safetensors checkpoint")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of a run")
    p.add_argument("--attacks", default="natural,fgsm,pgd20,cw", help="comma-separated (iat list attacks)")
    p.add_argument("--eps", default=None, help="default: the training eps")
    p.add_argument("--norm", default=None, choices=["linf", "l2"], help="default: the training norm")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--n-examples", type=int, default=None, help="first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dataset", default=None, help="default: the training data set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval-<checkpoint>.json)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iat", description="Inverse adversarial training and robust evaluation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=["models", "attacks", "methods", "datasets"])
    p = sub.add_parser("data", help="data sets")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("name")
    p.add_argument("--root", default=None, help="data root (default $IAT_DATA_DIR or ./data)")
    return parser


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def train_config(args: argparse.Namespace) -> C.TrainConfig:
    """Defaults <- config file <- flags."""
    cfg = C.TrainConfig()
    if args.config:
        C.update(cfg, C.read_config_file(args.config))
    for flag, key in TRAIN_FLAGS.items():
        if getattr(args, flag) is not None:
            C.set_path(cfg, key, getattr(args, flag))
    for key, value in _pairs(args.set, "--set").items():
        C.set_path(cfg, key, value)
    options = dict(cfg.method_options)
    if args.beta is not None:
        options["beta"] = args.beta
    options.update(_pairs(args.option, "--option"))
    cfg.method_options = options
    if args.no_progress:
        cfg.progress = False
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer

    cfg = train_config(args)
    out = Path(args.out)
    exists = (out / "config.json").exists() or (out / "checkpoints").exists()
    if args.resume and not (out / "checkpoints" / "last.safetensors").exists():
        raise UsageError(f"--resume: {out} holds no checkpoint to resume from")
    if exists and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    _check_writable(out)
    trainer = Trainer(cfg, out)
    if args.resume:
        trainer.resume()
    elif exists:
        for name in ("checkpoints", "metrics.jsonl", "config.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    summary = trainer.fit()
    print(json.dumps({"run": str(out), **summary}))
    return 0


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    import os

    if not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write to {probe}; choose another --out")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval_cli import run_eval

    return run_eval(args)


def cmd_list(args: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    registry = {"models": MODELS, "attacks": ATTACKS, "methods": METHODS, "datasets": DATASETS}[args.what]
    items = registry.describe()
    width = max(map(len, items))
    for name, text in items.items():
        print(f"{name:<{width}}  {text}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import fetch_dataset

    path = fetch_dataset(args.name, args.root)
    print(f"{args.name}: ready in {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "data": cmd_data}
    try:
        return commands[args.command](args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"iat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
