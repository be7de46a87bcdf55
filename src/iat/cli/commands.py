"""The subcommands: each parser is generated from its config dataclass, each handler turns the parsed
flags into that config and calls the library (training.run_dir, evaluation.pipeline, reporting, reproduce)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from ..errors import UsageError
from .flags import TRAIN_SKIP, add_flags, build, choices_text, given

DESTS: dict[str, dict[str, str]] = {}  # command -> dest -> dotted key of its config


def train_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat train` and its flags (generated from TrainConfig)."""
    p = sub.add_parser("train", help="train a model; RUN_DIR gets config.json, metrics.jsonl, checkpoints/")
    p.add_argument("--config", help="TOML or JSON file with the same keys as config.json's 'config' (default: none)")
    p.add_argument("--out", default=None, help="run directory of a new run (default: none; required unless --resume)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (or --out) from its last checkpoint with the settings in its config.json "
                        "(default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace a run that already exists in --out (default: off)")
    DESTS["train"] = add_flags(p, C.TrainConfig, skip=TRAIN_SKIP)
    p.add_argument("--beta", default=None, help="weight of the method's regulariser, the method option beta "
                   "(default: the method's own)")
    p.add_argument("--bn-mode", default=None, help="BatchNorm mode while crafting, the method option bn_mode "
                   "(default: the method's own; one of: train, eval, keep)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -O eps_inv=4/255 -O kl_direction=inv||adv (default: none; "
                        "`iat list methods` names the methods)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key by dotted path, e.g. --set optim.momentum=0.9 (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")


def pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """KEY=VALUE items (-O, --set) as a dict; `what` names the flag in the error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def train_config(args: argparse.Namespace, base: Optional[C.TrainConfig] = None) -> tuple[C.TrainConfig, str]:
    """Defaults (or a resumed run's saved config) <- config file <- flags, and where the threat model came
    from: without an eps anywhere, a new run takes its data set's standard one (data.standards)."""
    cfg = base or C.TrainConfig()
    typed: set[str] = set()  # the dotted keys the config file and the flags set
    if args.config:
        values = C.read_config_file(args.config)
        section = values.get("threat")
        typed |= {f"threat.{k}" for k in section} if isinstance(section, dict) else set()
        cfg = C.update(cfg, values)
    typed |= set(given(args, DESTS["train"]))
    cfg = build(C.TrainConfig, args, DESTS["train"], base=cfg)
    for key, value in pairs(args.set, "--set").items():
        typed.add(key)
        cfg = C.set_path(cfg, key, value)
    source = "the run's config.json"
    if base is None:  # a resumed run keeps the explicit threat model of its config.json
        from ..data import resolve_threat

        threat_keys = {k.split(".", 1)[1] for k in typed if k.startswith("threat.")}
        cfg.threat, source = resolve_threat(cfg.data.name, cfg.threat, threat_keys)
    options = dict(cfg.method_options)
    for name, value in (("beta", args.beta), ("bn_mode", args.bn_mode)):
        if value is not None:
            options[name] = value
    options.update(pairs(args.option, "--option"))
    cfg.method_options = options
    if args.no_progress:
        cfg.progress = False
    return cfg, source


def cmd_train(args: argparse.Namespace) -> int:
    """`iat train`: a new run in --out, or --resume one; prints the run's summary as JSON."""
    from ..training import run_dir

    resume = args.resume if isinstance(args.resume, str) else None
    if resume and args.out and Path(resume) != Path(args.out):
        raise UsageError(f"--resume {resume} and --out {args.out} name different run directories; give one")
    out = Path(resume or args.out or "")
    if not (resume or args.out):
        raise UsageError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    saved = run_dir.saved_run(out) if args.resume else None
    cfg, source = train_config(args, C.from_dict(saved.config) if saved else None)
    summary = run_dir.train(cfg, out, saved=saved, overwrite=args.overwrite)
    from ..runtime.distributed import info

    if info().is_main:
        print(json.dumps({"run": str(out), "threat": {**cfg.threat.describe(), "from": source}, **summary}))
    return 0


def eval_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat eval` and its flags (generated from EvalConfig)."""
    from ..evaluation.pipeline import EvalConfig

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the test split")
    p.add_argument("target", help="RUN_DIR or a checkpoint file (.safetensors, or a PyTorch state_dict .pt)")
    DESTS["eval"] = add_flags(p, EvalConfig, skip=("progress",))
    p.add_argument("--out", default=None, help="results JSON (default: RUN_DIR/eval-<checkpoint>.json); .csv, .md "
                   "and -eps-sweep.png go beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")


def cmd_eval(args: argparse.Namespace) -> int:
    """`iat eval`: evaluate a run or checkpoint, print the table and checks, write JSON/CSV/Markdown."""
    from ..evaluation.extend import extendable
    from ..evaluation.pipeline import EvalConfig, default_out, evaluate_prepared, identity, prepare_checkpoint
    from ..evaluation.replace import check_replace
    from ..reporting.eval_tables import format_checks, format_sweep, format_table, write_eval_files
    from ..reporting.render import fmt_eps

    cfg = build(EvalConfig, args, DESTS["eval"])
    cfg.progress = not args.no_progress
    out = Path(args.out) if args.out else default_out(args.target, cfg)
    if out.suffix != ".json":
        raise UsageError(f"--out must name a .json file (CSV and Markdown go beside it), got {out}")
    from ..evaluation.pipeline import check_out_file
    from ..reporting.eval_tables import output_paths
    from ..training.run_dir import check_writable, run_lock

    check_writable(out.parent)  # before the evaluation, not after it
    # a folder or a symlink loop at --out: refused now
    check_out_file(out, [p for k, p in output_paths(out).items() if k != "png" or cfg.eps_sweep])
    with run_lock(out):  # a second eval writing the same results is refused before it attacks anything
        prepared = prepare_checkpoint(args.target, cfg)
        same = identity(prepared, cfg)
        prior = extendable(out, same, cfg.seed, prepared.about["checkpoint"]) if cfg.extend else None
        if prior is None:
            check_replace(out, same, cfg.overwrite)
        else:
            print(f"iat: {out} holds this evaluation on the first {prior.data['n_examples']} examples; attacking "
                  f"examples {prior.data['n_examples']}..{same['n_examples'] - 1} only (--extend)")
        result = evaluate_prepared(prepared, cfg, prior)
        written = write_eval_files(result, out)
    print(f"{result.checkpoint} (epoch {result.checkpoint_epoch}) on {result.data['source']}, "
          f"test split, {result.data['n_examples']} examples, seed {cfg.seed}, mode {result.mode},")
    source = "--eps" if cfg.eps is not None else (result.method or {}).get("threat_model",
                                                                          "the run's training threat model")
    print(f"threat model {result.threat['norm']} eps {fmt_eps(result.threat['eps'])} ({source}):")
    print(format_table(result.results))
    if result.eps_sweep:
        print()
        print(format_sweep(result.eps_sweep))
    print()
    print(format_checks(result.sanity))
    print(f"results: {', '.join(map(str, written))}  ({result.seconds:.0f}s)")
    return 0


def report_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat report` and its flags (generated from ReportConfig)."""
    from ..reporting.report import ReportConfig

    p = sub.add_parser("report", help="runs side by side (best and last checkpoint) and their training curves")
    DESTS["report"] = add_flags(p, ReportConfig, positional=("runs",))


def cmd_report(args: argparse.Namespace) -> int:
    """`iat report`: write the side-by-side report of the given run directories."""
    from ..reporting.report import ReportConfig, write_report

    cfg = build(ReportConfig, args, DESTS["report"])
    if not cfg.runs:
        raise UsageError("iat report needs at least one RUN_DIR")
    print("report: " + ", ".join(map(str, write_report(cfg))))
    return 0


def reproduce_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat reproduce` and its flags (generated from ReproduceConfig)."""
    from ..reproduce import ReproduceConfig

    p = sub.add_parser("reproduce", help="train and evaluate every cell of an experiment table, then write the table")
    DESTS["reproduce"] = add_flags(p, ReproduceConfig, positional=("table",))
    p.add_argument("--slurm-config", default=None, metavar="FILE",
                   help="slurm: a TOML or JSON file of the cells' job resources, keys as the flags (partition, "
                        "gpus_per_cell, nodes_per_cell, ...); flags typed win (default: none)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`iat reproduce`: advance every cell of a table, then write the table."""
    from ..reproduce import ReproduceConfig, read_slurm_config, reproduce

    base = ReproduceConfig()
    if args.slurm_config:
        base = read_slurm_config(args.slurm_config, base)
    cfg = build(ReproduceConfig, args, DESTS["reproduce"], base=base)
    if args.slurm_config and cfg.executor != "slurm":
        raise UsageError("--slurm-config is for --executor slurm")
    return reproduce(cfg)


def list_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat list`, one choice per registry."""
    from ..training.setup import registries

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=list(registries()), help="which registry")


def cmd_list(args: argparse.Namespace) -> int:
    """`iat list WHAT`: the registry's names, each with its one-line help."""
    from ..training.setup import registries

    items = registries()[args.what].describe()
    width = max(map(len, items))
    for name, text in items.items():
        print(f"{name:<{width}}  {text}")
    return 0


def data_parser(sub: argparse._SubParsersAction) -> None:
    """Add `iat data fetch NAME`."""
    p = sub.add_parser("data", help="data sets")
    p.add_argument("action", choices=["fetch"], help="fetch: download or rebuild a data set in its official format")
    p.add_argument("name", help="data set" + choices_text("datasets"))
    p.add_argument("--root", default=None, help="data root (default: $IAT_DATA_DIR or ./data)")


def cmd_data(args: argparse.Namespace) -> int:
    """`iat data fetch NAME`: download or rebuild the data set, print its folder."""
    from ..data import fetch_dataset
    from ..data.core import resolve_root
    from ..training.run_dir import check_writable

    check_writable(resolve_root(args.root), "--root (or $IAT_DATA_DIR)")  # before any download
    path = fetch_dataset(args.name, args.root)
    print(f"{args.name}: ready in {path}")
    return 0


INTERRUPTED = {  # what Ctrl-C or SIGTERM leaves behind, said in one line
    "train": "the last checkpoint written (if any) is kept, and --resume continues from it",
    "eval": "no results were written (they are written when the evaluation ends)",
    "report": "evaluations already written are kept; the report was not written",
    "reproduce": "finished cells and interrupted runs' checkpoints are kept; the same command continues them",
}

COMMANDS: dict[str, tuple[Any, Any]] = {
    "train": (train_parser, cmd_train), "eval": (eval_parser, cmd_eval), "report": (report_parser, cmd_report),
    "reproduce": (reproduce_parser, cmd_reproduce), "list": (list_parser, cmd_list), "data": (data_parser, cmd_data)}

