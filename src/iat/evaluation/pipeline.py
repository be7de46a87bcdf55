"""`iat eval`: robust accuracy of a checkpoint on the test split, with the protocol next to each number.

Writes RESULTS.json (everything, including per-example outcomes and the sanity checks), RESULTS.csv and
RESULTS.md beside it, and RESULTS-eps-sweep.png with --eps-sweep. Attacks are registry names with
optional overrides: `pgd20`, `pgd20:restarts=5`, `cw:steps=100`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..attacks import PGD, Natural, create_attack
from ..training.checkpoint import atomic_write_text
from ..data import load_dataset
from .accuracy import pack_flags, robust_accuracy
from ..errors import UsageError
from .loading import checkpoint_path, is_pickle, load_model, load_model_file
from ..training.device import resolve_device
from .sanity import check_class_coverage, check_eps_sweep, default_sweep, eps_sweep, run_checks
from ..reporting.eval_tables import format_checks, format_table, to_csv, to_markdown
from ..values import parse_number


@dataclasses.dataclass
class EvalConfig:
    """What `iat eval` runs; saved, resolved, in every results file."""

    checkpoint: str = "best"  # which checkpoint of a run directory: best | last
    attacks: str = "natural,fgsm,pgd20,cw"
    eps: Optional[float] = None  # None: the training eps
    norm: Optional[str] = None  # None: the training norm
    restarts: int = 1  # for every random-start PGD attack without its own :restarts=
    n_examples: Optional[int] = None  # first N test examples; None: all
    batch_size: int = 256
    dataset: Optional[str] = None
    model: Optional[str] = None  # architecture of a plain state_dict .pt (with dataset)
    data_dir: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    worst_case_only: bool = False
    eps_sweep: Optional[str] = None  # None | "auto" | comma-separated eps values
    sweep_attack: str = "pgd20"
    progress: bool = True


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    cfg = EvalConfig()
    for f in dataclasses.fields(EvalConfig):
        if f.name != "progress" and getattr(args, f.name, None) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    cfg.progress = not getattr(args, "no_progress", False)
    if cfg.eps is not None:
        cfg.eps = parse_number(cfg.eps, "--eps")
    return cfg


def _value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return parse_number(text)
    except UsageError:
        return text


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd20:restarts=5:steps=50' -> ('pgd20', {'restarts': 5, 'steps': 50})."""
    name, *parts = spec.split(":")
    overrides = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise UsageError(f"attack overrides look like NAME:KEY=VALUE (e.g. pgd20:restarts=5), got {spec!r}")
        overrides[key.strip()] = _value(value.strip())
    return name.strip(), overrides


def build_attacks(names: str, eps: float, norm: str, restarts: int = 1) -> dict[str, Any]:
    """Comma-separated specs -> {spec: attack}; 'natural' comes first even when not asked for."""
    specs = [n.strip() for n in names.split(",") if n.strip()]
    if not specs:
        raise UsageError("--attacks is empty; e.g. --attacks natural,pgd20")
    if len(set(specs)) != len(specs):
        raise UsageError(f"--attacks names an attack twice: {names}")
    attacks: dict[str, Any] = {"natural": Natural()}
    for spec in specs:
        name, overrides = parse_attack_spec(spec)
        if name == "natural":
            continue
        try:
            attack = create_attack(name, **{"eps": eps, "norm": norm, **overrides})
        except TypeError as err:
            raise UsageError(f"attack {name!r} does not accept {sorted(overrides)}: {err}") from None
        if isinstance(attack, PGD) and attack.random_start and restarts > 1 and "restarts" not in overrides:
            attack = dataclasses.replace(attack, restarts=restarts)
        attacks[spec] = attack
    return attacks


def sweep_values(text: str, eps: float, norm: str, input_numel: int) -> list[float]:
    if text == "auto":
        return default_sweep(eps, norm, input_numel)
    values = sorted({parse_number(v, "--eps-sweep") for v in text.split(",") if v.strip()})
    if len(values) < 2:
        raise UsageError("--eps-sweep needs at least two eps values, e.g. 0,2/255,4/255,8/255 (or no value: auto)")
    return values


def _load(path: Path, cfg: EvalConfig, device: torch.device) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """(model, resolved settings, data bundle, training threat model) for an iat checkpoint or a plain .pt."""
    if is_pickle(path):  # a state_dict from elsewhere: weights only, architecture and data from the flags
        bundle = load_dataset(cfg.dataset, cfg.data_dir) if cfg.dataset else None
        model, state = load_model_file(path, cfg.model, bundle, device)
        if cfg.eps is None:
            raise UsageError(f"{path} records no threat model; give --eps (and --norm, default linf)")
        resolved = {"model": state["model_spec"], "method": {"name": "unknown (plain state_dict)"}}
        return model, resolved, bundle, {"eps": cfg.eps, "norm": cfg.norm or "linf"}
    model, state = load_model(path, device)
    resolved = dict(state["resolved"], epoch=state.get("progress", {}).get("epoch"))
    data = resolved["config"]["data"]
    bundle = load_dataset(cfg.dataset or data["name"], cfg.data_dir or data["root"])
    return model, resolved, bundle, resolved["config"]["threat"]


def evaluate_checkpoint(target: str, cfg: EvalConfig) -> dict[str, Any]:
    """Load, attack, check; return the results dict that write_results saves."""
    is_run = Path(target).is_dir()
    path = checkpoint_path(target, cfg.checkpoint)
    device = resolve_device(cfg.device)
    model, resolved, bundle, train_threat = _load(path, cfg, device)
    eps = cfg.eps if cfg.eps is not None else train_threat["eps"]
    norm = cfg.norm or train_threat["norm"]
    attacks = build_attacks(cfg.attacks, eps, norm, cfg.restarts)
    if cfg.eps_sweep:
        from ..reporting.plots import require_matplotlib

        require_matplotlib()
    test = bundle.test
    n = len(test) if cfg.n_examples is None else cfg.n_examples
    if not 0 < n <= len(test):
        raise UsageError(f"--n-examples must be between 1 and {len(test)}, got {n}")
    x, y = test.x[:n], test.y[:n]
    numel = math.prod(x.shape[1:])
    sweep_eps = sweep_values(cfg.eps_sweep, eps, norm, numel) if cfg.eps_sweep else None
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    acc = robust_accuracy(model, x, y, attacks, batch_size=cfg.batch_size, progress=cfg.progress, desc="eval",
                          worst_case_only=cfg.worst_case_only, generator=torch.Generator().manual_seed(cfg.seed))
    checks = [c.to_dict() for c in run_checks(model, x, y, attacks, acc, batch_size=cfg.batch_size)]
    checks.append(check_class_coverage(y, test.y, "test").to_dict())
    sweep = None
    if sweep_eps:
        points = eps_sweep(model, x, y, sweep_eps, attack=cfg.sweep_attack, norm=norm, batch_size=cfg.batch_size,
                           seed=cfg.seed, progress=cfg.progress)
        checks += [c.to_dict() for c in check_eps_sweep(points, acc.natural, norm, numel)]
        sweep = {"attack": cfg.sweep_attack, "norm": norm, "points": points}
    return {
        "iat_eval": 1, "run": str(target) if is_run else None, "checkpoint": str(path),
        "checkpoint_kind": cfg.checkpoint if is_run else None, "checkpoint_epoch": resolved.get("epoch"),
        "data": {"name": bundle.name, "source": bundle.source, "split": "test", "n_examples": n},
        "model": resolved["model"], "method": resolved["method"], "train_threat": train_threat,
        "threat": {"eps": eps, "norm": norm}, "config": dataclasses.asdict(cfg), "seed": cfg.seed,
        "mode": acc.mode, "device": str(device), "torch": torch.__version__,
        "seconds": time.perf_counter() - t0, "results": _rows(acc, attacks), "sanity": checks,
        "eps_sweep": sweep,
        "diagnostics": {k: a.diagnostics() for k, a in attacks.items() if hasattr(a, "diagnostics")},
        "per_example": {k: pack_flags(v) for k, v in acc.per_example.items()},
    }


def _rows(acc: Any, attacks: dict[str, Any]) -> list[dict[str, Any]]:
    n = acc.total
    # In cumulative mode the first attack still ran on every naturally correct example: its own accuracy.
    first = next((k for k, a in attacks.items() if not isinstance(a, Natural)), None)

    def counted(k: str) -> str:
        if isinstance(attacks[k], Natural):
            return "natural"
        return "cumulative" if acc.mode == "cumulative" and k != first else "own"

    rows = [{"attack": k, "accuracy": v / n, "correct": v, "total": n, "attacked": acc.attacked.get(k, 0),
             "counted": counted(k), "protocol": attacks[k].describe()} for k, v in acc.correct.items()]
    rows.append({"attack": "worst case", "accuracy": acc.worst_case / n, "correct": acc.worst_case, "total": n,
                 "counted": "worst case", "protocol": {"per_example_worst_case_of": list(attacks), "mode": acc.mode}})
    return rows


def output_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {"json": out, "csv": out.with_suffix(".csv"), "md": out.with_suffix(".md"),
            "png": stem.with_name(stem.name + "-eps-sweep.png")}


def write_results(result: dict[str, Any], out: Path) -> list[Path]:
    """JSON, CSV and Markdown (and the eps-sweep PNG) side by side; returns the paths written."""
    paths = output_paths(out)
    written = []
    if result.get("eps_sweep"):
        from ..reporting.plots import plot_eps_sweep

        sweep, t = result["eps_sweep"], result["threat"]
        title = (f"{sweep['attack']} ({sweep['norm']}) on {result['data']['name']}, "
                 f"{result['data']['n_examples']} test examples, seed {result['seed']}")
        written.append(plot_eps_sweep(sweep["points"], paths["png"], title=title, train_eps=t["eps"]))
        sweep["plot"], sweep["plot_name"] = str(paths["png"]), paths["png"].name
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths["csv"], to_csv(result))
    atomic_write_text(paths["md"], to_markdown(result))
    return [paths["json"], paths["csv"], paths["md"], *written]


def default_out(target: str, cfg: EvalConfig) -> Path:
    base = Path(target)
    if base.is_dir():
        return base / f"eval-{cfg.checkpoint}.json"
    return base.with_suffix(".eval.json")


def run_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else default_out(args.target, cfg)
    if out.suffix != ".json":
        raise UsageError(f"--out must name a .json file (CSV and Markdown go beside it), got {out}")
    result = evaluate_checkpoint(args.target, cfg)
    written = write_results(result, out)
    print(f"{result['checkpoint']} (epoch {result['checkpoint_epoch']}) on {result['data']['source']}, "
          f"test split, {result['data']['n_examples']} examples, seed {cfg.seed}, mode {result['mode']}:")
    print(format_table(result["results"]))
    print()
    print(format_checks(result["sanity"]))
    print(f"results: {', '.join(map(str, written))}  ({result['seconds']:.0f}s)")
    return 0
