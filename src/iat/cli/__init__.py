"""Command line: `iat train`, `iat eval`, `iat report`, `iat reproduce`, `iat list`, `iat data fetch`.

Bad input ends with a one-line message on stderr and exit status 2 (a traceback only with --debug);
an operating-system failure (disk full, permissions) with a one-line message and status 1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import config as C
from ..errors import UsageError

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
    p.add_argument("--out", default=None, help="run directory of a new run")
    for flag in TRAIN_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, metavar=flag.split("_")[-1].upper())
    p.add_argument("--beta", default=None, help="weight of the method's regulariser (method option beta)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -O eps_inv=4/255 -O kl_direction=inv||adv")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key by dotted path, e.g. --set optim.momentum=0.9")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (or --out) from its last checkpoint with the settings in its config.json")
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
    p.add_argument("--model", default=None, help="architecture of a plain PyTorch state_dict .pt (with --dataset)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval-<checkpoint>.json); "
                   ".csv, .md and -eps-sweep.png go beside it")
    p.add_argument("--worst-case-only", action="store_true",
                   help="run each attack only on examples still robust (columns become cumulative; faster)")
    p.add_argument("--eps-sweep", nargs="?", const="auto", default=None, metavar="EPS,EPS,...",
                   help="also draw accuracy against eps as PNG (no value: 0 .. 4 eps and the full range)")
    p.add_argument("--sweep-attack", default="pgd20", help="attack of the eps sweep (default pgd20)")
    p.add_argument("--no-progress", action="store_true")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="runs side by side (best and last checkpoint) and their training curves")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their eval-*.json files are read)")
    p.add_argument("--out", default="report", help="folder for report.md/.csv/.json and curves.png (default ./report)")
    p.add_argument("--checkpoints", default="best,last", help="best, last or best,last")
    p.add_argument("--eval-missing", action="store_true", help="run `iat eval` first where a checkpoint has none")
    p.add_argument("--attacks", default="natural,fgsm,pgd20,cw", help="attacks for --eval-missing")
    p.add_argument("--n-examples", type=int, default=None, help="for --eval-missing: first N test examples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="no curves.png (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true")


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train and evaluate every cell of an experiment table, then write the table")
    p.add_argument("table", nargs="?", help="a built-in table (iat reproduce --list) or a TOML table spec")
    p.add_argument("--list", action="store_true", help="list the built-in tables")
    p.add_argument("--out", default=None, help="folder of the cells' run directories (default runs/reproduce/TABLE)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the table's")
    p.add_argument("--jobs", type=int, default=None, help="cells run at once (default 1, or one per --gpus id)")
    p.add_argument("--gpus", default=None, metavar="ID,ID,...",
                   help="GPU ids; each running cell gets one of them alone (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default cores / jobs)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and stop")
    p.add_argument("--table-only", action="store_true", help="write the table from the finished cells; run nothing")
    p.add_argument("--results-md", default=None, metavar="FILE",
                   help="also paste the table into FILE between its markers (plot beside it in results/)")
    p.add_argument("--no-plots", action="store_true", help="no curves.png (no matplotlib needed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iat", description="Inverse adversarial training and robust evaluation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _reproduce_parser(sub)
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


def train_config(args: argparse.Namespace, base: Optional[C.TrainConfig] = None) -> C.TrainConfig:
    """Defaults (or a resumed run's saved config) <- config file <- flags."""
    cfg = base or C.TrainConfig()
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
    from ..training.trainer import Trainer

    out = _run_dir(args)
    exists = (out / "config.json").exists() or (out / "checkpoints").exists()
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pass only one of them")
    if exists and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    saved = _saved_run(out) if args.resume else None
    cfg = train_config(args, C.from_dict(saved["config"]) if saved else None)
    _check_writable(out)
    # Building the Trainer loads the data and builds model and method, so every bad input fails here,
    # before anything in `out` is created or replaced.
    trainer = Trainer(cfg, out)
    main_rank = trainer.dist.is_main  # under torchrun only rank 0 touches the run directory
    if saved and (out / "checkpoints" / "last.safetensors").exists():
        trainer.resume()
    elif saved:
        trainer.check_same_run(saved, out / "config.json")
        if main_rank:
            print(f"iat: {out} holds no checkpoint yet; starting the run from the beginning", file=sys.stderr)
            _clear_run(out)
    elif exists and main_rank:
        _clear_run(out)
    summary = trainer.fit()  # starts with a barrier, so no rank trains before the directory is cleared
    if main_rank:
        print(json.dumps({"run": str(out), **summary}))
    return 0


def _run_dir(args: argparse.Namespace) -> Path:
    """`--resume RUN_DIR`, or `--out RUN_DIR` (with a bare `--resume`, the older spelling)."""
    resume = args.resume if isinstance(args.resume, str) else None
    if resume and args.out and Path(resume) != Path(args.out):
        raise UsageError(f"--resume {resume} and --out {args.out} name different run directories; give one")
    where = resume or args.out
    if not where:
        raise UsageError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    return Path(where)


def _saved_run(out: Path) -> dict[str, Any]:
    """The resolved settings a run saved in its config.json: a resumed run starts from these."""
    from ..training.checkpoint import load_checkpoint

    path, last = out / "config.json", out / "checkpoints" / "last.safetensors"
    if not path.is_file() and not last.is_file():
        raise UsageError(f"--resume: {out} holds no run to continue (no config.json); start one with --out {out}")
    try:
        if path.is_file():
            saved = json.loads(path.read_text())
        else:  # config.json deleted by hand: the checkpoint holds the same settings
            path, saved = last, load_checkpoint(last).get("resolved")
        C.from_dict(saved["config"])
    except UsageError as err:
        raise UsageError(f"--resume: {path}: {err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"--resume: {path} is damaged ({type(err).__name__}: {err}); it cannot be resumed") from None
    return saved


def _clear_run(out: Path) -> None:
    for name in ("checkpoints", "metrics.jsonl", "config.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _check_writable(out: Path) -> None:
    """Fail before any work: `out` must be, or be creatable in, a folder we can really write to."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create run directory {out}: {probe} is a file, not a folder; choose another --out")
    try:  # a real write, because as root os.access says yes even on a read-only mount
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {probe} ({err.strerror}); choose another --out") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation.pipeline import run_eval

    return run_eval(args)


def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting.report import run_report

    return run_report(args)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..reproduce import run_reproduce

    return run_reproduce(args)


def cmd_list(args: argparse.Namespace) -> int:
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..methods import METHODS
    from ..models import MODELS

    registry = {"models": MODELS, "attacks": ATTACKS, "methods": METHODS, "datasets": DATASETS}[args.what]
    items = registry.describe()
    width = max(map(len, items))
    for name, text in items.items():
        print(f"{name:<{width}}  {text}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ..data import fetch_dataset

    path = fetch_dataset(args.name, args.root)
    print(f"{args.name}: ready in {path}")
    return 0


def _show_warning(message: Any, *_: Any, **__: Any) -> None:
    print(f"iat: warning: {message}", file=sys.stderr)  # one line, without the source line Python adds


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "reproduce": cmd_reproduce,
                "list": cmd_list, "data": cmd_data}
    try:
        with warnings.catch_warnings():  # restores the global hook when main returns (tests call main())
            warnings.showwarning = _show_warning
            return commands[args.command](args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"iat: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        print(f"iat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
