"""`iat eval`: robust accuracy of a checkpoint on the test split, with the protocol next to each number.

Loads the model and the run's threat model, attacks the first n test examples with every requested attack
(registry names with optional overrides: `pgd20`, `pgd20:restarts=5`, `cw:steps=100`), runs the sanity
checks (and an eps sweep if asked), and returns one typed `EvalRecord`; reporting.eval_tables writes it
with its CSV, Markdown and plot.
"""
from __future__ import annotations

import dataclasses
import math
import time
import typing
from pathlib import Path
from typing import Any, Optional

import torch

from ..attacks import Attack, Natural
from ..config import setting
from ..data import load_dataset, resolve_threat, standard_threat
from ..errors import UsageError
from ..extras import require_matplotlib
from ..records import EvalRecord, RunRecord
from ..runtime.device import resolve_device
from ..threat import ThreatModel
from ..values import parse_number
from .accuracy import pack_flags, robust_accuracy
from .attack_spec import build_attacks
from .extend import merge, part_seed, parts, restore_attack_state
from .loading import checkpoint_path, is_pickle, load_model, load_model_file
from .sanity import check_class_coverage, run_checks
from .sweep import check_eps_sweep, default_sweep, eps_sweep

SWEEP_N_DEFAULT = 1000  # a bare --eps-sweep (8 PGD-20 points) on 10,000 examples takes over an hour on a CPU


@dataclasses.dataclass
class EvalConfig:
    """What `iat eval` runs; saved, resolved, in every results file (flags are generated from these)."""

    checkpoint: str = setting("best", "which checkpoint of a run directory (-ema: the EMA weights, optim.ema_decay)",
                              choices=("best", "last", "best-ema", "last-ema"))
    attacks: str = setting("natural,fgsm,pgd20,cw", "comma-separated attacks, NAME[:KEY=VALUE...] (iat list attacks)")
    eps: Optional[float] = setting(None, "radius of the threat ball (default: the training eps; for a plain .pt, "
                                  "the data set's standard)")
    norm: Optional[str] = setting(None, "threat ball (default: the training norm)", choices=("linf", "l2"))
    restarts: int = setting(1, "restarts of every random-start PGD attack without its own :restarts=")
    n_examples: Optional[int] = setting(None, "first N test examples (default: all)")
    batch_size: int = setting(256, "examples per attack batch")
    dataset: Optional[str] = setting(None, "data set (default: the training data set)", choices="datasets")
    model: Optional[str] = setting(None, "architecture of a plain PyTorch state_dict .pt (with --dataset): a "
                                   "registered name or package.module:factory",
                                   choices="models")
    data_dir: Optional[str] = setting(None, "data root folder; none: the run's, else $IAT_DATA_DIR or ./data")
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    seed: int = setting(0, "seed of the attacks' random starts")
    worst_case_only: bool = setting(False, "run each attack only on examples still robust (columns become "
                                    "cumulative; faster)")
    eps_sweep: Optional[str] = setting(None, "also draw accuracy against eps: EPS,EPS,... or auto (0 .. 4 eps "
                                       "and the full range)")
    sweep_attack: str = setting("pgd20", "attack of the eps sweep", choices="attacks")
    sweep_n_examples: Optional[int] = setting(None, "first N test examples of the eps sweep (default: "
                                              f"--n-examples if given, else at most {SWEEP_N_DEFAULT})")
    extend: bool = setting(False, "when the results file holds this evaluation on the first K < N examples, "
                           "attack only examples K..N-1 and write the merged result (see evaluation.extend)")
    overwrite: bool = setting(False, "replace an existing results file that holds an evaluation with other "
                              "attacks, examples, threat model, mode or checkpoint epoch (the same evaluation is "
                              "always replaced)")
    progress: bool = setting(True, "progress bars")


def sweep_values(text: str, threat: ThreatModel, input_numel: int) -> list[float]:
    """--eps-sweep's value -> the sorted, distinct eps values to sweep ("auto": `default_sweep` around `threat`)."""
    if text == "auto":
        return default_sweep(threat.eps, threat.norm, input_numel)
    values = sorted({parse_number(v, "--eps-sweep") for v in text.split(",") if v.strip()})
    if len(values) < 2:
        raise UsageError("--eps-sweep needs at least two eps values, e.g. 0,2/255,4/255,8/255 (or no value: auto)")
    return values


def _load(path: Path, cfg: EvalConfig, device: torch.device) -> tuple[Any, dict[str, Any], Any, ThreatModel]:
    """(model, what the checkpoint says of itself, data bundle, training threat model) for an iat checkpoint
    or a plain .pt."""
    if is_pickle(path):  # a state_dict from elsewhere: weights only, architecture and data from the flags
        bundle = load_dataset(cfg.dataset, cfg.data_dir) if cfg.dataset else None
        model, state = load_model_file(path, cfg.model, bundle, device)
        # the file records no threat model: --eps, else the data set's standard one (recorded)
        if cfg.eps is not None:
            threat, source = ThreatModel(eps=cfg.eps, norm=cfg.norm or "linf"), "--eps"
        else:
            assert bundle is not None  # load_model_file refused a state_dict without --dataset
            standard_threat(bundle.name)  # a data set without one: "give --eps"
            threat, source = resolve_threat(bundle.name, ThreatModel(norm=cfg.norm or "linf"), ())
        about = {"model": state["model_spec"], "method": {"name": "unknown (plain state_dict)", "threat_model": source},
                 "epoch": None}
        return model, about, bundle, threat
    model, state = load_model(path, device)
    run = RunRecord.from_dict(state.get("resolved"), str(path))
    about = {"model": run.model, "method": run.method, "epoch": state.get("progress", {}).get("epoch")}
    data = run.config["data"]
    bundle = load_dataset(cfg.dataset or data["name"], cfg.data_dir or data["root"])
    check_fits(path, state["model_spec"], bundle)
    return model, about, bundle, ThreatModel(**run.config["threat"])


def check_fits(path: Path, spec: dict[str, Any], bundle: Any) -> None:
    """The checkpoint's classes, channels and image size must be the data's (else a number means nothing).
    Models are built for square input_size x input_size images, so both height and width must match."""
    _, c, h, w = bundle.test.x.shape
    size = spec.get("input_size")
    for what, mine, theirs in (("classes", spec.get("num_classes"), bundle.num_classes),
                               ("input channels", spec.get("in_channels"), int(c)),
                               ("images", size and f"{size}x{size}", f"{int(h)}x{int(w)}")):
        if mine is not None and mine != theirs:
            raise UsageError(f"{path} was trained for {mine} {what} but {bundle.name} has {theirs}; evaluate it on "
                             "the data set it was trained on (--dataset)")


@dataclasses.dataclass
class Prepared:
    """A loaded checkpoint and everything that says which evaluation will run, before any attack runs."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    y_split: torch.Tensor
    threat: ThreatModel
    about: dict[str, Any]
    num_classes: Optional[int]
    attacks: dict[str, Attack]  # built once, in `threat`'s ball; the keys are the result rows' names, natural first


def evaluate_checkpoint(target: str, cfg: EvalConfig) -> EvalRecord:
    """Load, attack, check; return the record that reporting.eval_tables.write_eval_files saves."""
    return evaluate_prepared(prepare_checkpoint(target, cfg), cfg)


def identity(p: Prepared, cfg: EvalConfig) -> dict[str, Any]:
    """What makes two evaluations the same one (replace.check_replace compares it with a results file)."""
    return {"attacks": list(p.attacks), "n_examples": len(p.x), "threat": {"eps": p.threat.eps, "norm": p.threat.norm},
            "mode": "cumulative" if cfg.worst_case_only else "each", "checkpoint_epoch": p.about["checkpoint_epoch"]}


def evaluate_prepared(p: Prepared, cfg: EvalConfig, prior: Optional[EvalRecord] = None) -> EvalRecord:
    """`prior`: a results file's record of this evaluation on fewer examples, to extend (evaluation.extend)."""
    return evaluate_examples(p.model, p.x, p.y, p.threat, cfg, p.about, y_split=p.y_split, num_classes=p.num_classes,
                             prior=prior, attacks=p.attacks)


def prepare_checkpoint(target: str, cfg: EvalConfig) -> Prepared:
    """Load the checkpoint and its data and resolve the threat model and the examples (no attack runs)."""
    is_run = Path(target).is_dir()
    path = checkpoint_path(target, cfg.checkpoint)
    device = resolve_device(cfg.device)
    model, loaded, bundle, train_threat = _load(path, cfg, device)
    threat = ThreatModel(eps=train_threat.eps if cfg.eps is None else cfg.eps, norm=cfg.norm or train_threat.norm)
    test = bundle.test
    n = len(test) if cfg.n_examples is None else cfg.n_examples
    if not 0 < n <= len(test):
        raise UsageError(f"--n-examples must be between 1 and {len(test)}, got {n}")
    about = {"run": str(target) if is_run else None, "checkpoint": str(path),
             "checkpoint_kind": cfg.checkpoint if is_run else None, "checkpoint_epoch": loaded["epoch"],
             "data": {"name": bundle.name, "source": bundle.source, "split": "test", "n_examples": n},
             "model": loaded["model"], "method": loaded["method"], "train_threat": train_threat.describe(),
             "config": dataclasses.asdict(cfg), "device": str(device)}
    return Prepared(model, test.x[:n], test.y[:n], test.y, threat, about, (loaded["model"] or {}).get("num_classes"),
                    build_attacks(cfg.attacks, threat, cfg.restarts))


def evaluate_examples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, cfg: EvalConfig,
                      about: dict[str, Any], *, y_split: torch.Tensor, num_classes: Optional[int],
                      prior: Optional[EvalRecord] = None,
                      attacks: Optional[dict[str, Attack]] = None) -> EvalRecord:
    """The one evaluation of `iat eval` and `iat.evaluate`: every attack of `cfg` in `threat`'s ball on (x, y),
    the sanity checks (class coverage against `y_split`, the labels the examples were taken from) and the
    eps sweep if asked. `about` holds the record's fields that say what was evaluated (checkpoint, data, ...).
    With `prior` (the same evaluation on the first K examples) only x[K:] is attacked (evaluation.extend).
    `attacks`: cfg.attacks already built in `threat`'s ball (prepare_checkpoint does), else they are built here."""
    if attacks is None:
        attacks = build_attacks(cfg.attacks, threat, cfg.restarts)
    start = 0 if prior is None else prior.data["n_examples"]
    if prior is not None:
        if cfg.eps_sweep:
            raise UsageError("--extend cannot add an eps sweep; run the sweep as its own evaluation (--out FILE)")
        restore_attack_state(attacks, prior)
    if cfg.eps_sweep:
        require_matplotlib()
    numel = math.prod(x.shape[1:])
    sweep_eps = sweep_values(cfg.eps_sweep, threat, numel) if cfg.eps_sweep else None
    m = sweep_size(cfg, len(x)) if cfg.eps_sweep else 0  # checked before the first attack runs
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    acc = robust_accuracy(model, x[start:], y[start:], attacks, batch_size=cfg.batch_size, progress=cfg.progress,
                          desc="eval", worst_case_only=cfg.worst_case_only,
                          generator=torch.Generator().manual_seed(part_seed(cfg.seed, start)))
    part_seconds = time.perf_counter() - t0
    acc = acc if prior is None else merge(prior, acc)
    checks = [c.to_dict() for c in run_checks(model, x, y, attacks, acc, batch_size=cfg.batch_size)]
    checks.append(check_class_coverage(y, y_split, about["data"]["split"], num_classes).to_dict())
    sweep = None
    if sweep_eps:
        assert acc.natural_ok is not None
        points = eps_sweep(model, x[:m], y[:m], sweep_eps, attack=cfg.sweep_attack, norm=threat.norm,
                           batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)
        natural = int(acc.natural_ok[:m].sum())
        checks += [c.to_dict() for c in check_eps_sweep(points, natural, threat.norm, numel)]
        sweep = {"attack": cfg.sweep_attack, "norm": threat.norm, "n_examples": m, "points": points}
    return EvalRecord(
        **about, threat={"eps": threat.eps, "norm": threat.norm}, seed=cfg.seed, mode=acc.mode,
        torch=torch.__version__, seconds=time.perf_counter() - t0 + (prior.seconds if prior else 0.0),
        parts=parts(prior, start, len(x), cfg.seed, part_seconds),
        results=_rows(acc, attacks), sanity=checks, eps_sweep=sweep,
        diagnostics={k: a.diagnostics() for k, a in attacks.items() if hasattr(a, "diagnostics")},
        per_example={k: pack_flags(v) for k, v in acc.per_example.items()})


def sweep_size(cfg: EvalConfig, n: int) -> int:
    """Examples of the eps sweep: --sweep-n-examples, else all n when --n-examples was given, else at most
    SWEEP_N_DEFAULT (the first ones, so the sweep's eps 0 is the main table's natural accuracy on them)."""
    if cfg.sweep_n_examples is not None:
        if not 0 < cfg.sweep_n_examples <= n:
            raise UsageError(f"--sweep-n-examples must be between 1 and {n} (the examples evaluated), "
                             f"got {cfg.sweep_n_examples}")
        return cfg.sweep_n_examples
    return n if cfg.n_examples is not None else min(n, SWEEP_N_DEFAULT)


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


def default_out(target: str, cfg: EvalConfig) -> Path:
    """The results file without --out: RUN/eval-CHECKPOINT.json for a run directory, else FILE.eval.json."""
    base = Path(target)
    if base.is_dir():
        return base / f"eval-{cfg.checkpoint}.json"
    return base.with_suffix(".eval.json")


def check_out_file(out: Path, siblings: typing.Iterable[Path] = ()) -> None:
    """Fail before any attack runs: `out` (and the files written beside it) must each be a file or absent,
    and their folder must be a folder. A folder, a symlink loop or a dangling path is a one-line UsageError."""
    for path in (out, *siblings):
        try:
            path.stat()
        except FileNotFoundError:
            if path.is_symlink():
                raise UsageError(f"--out {path} is a broken symlink; remove it or choose another --out") from None
            continue
        except NotADirectoryError:
            raise UsageError(f"--out {path}: {path.parent} is not a folder; choose another --out") from None
        except OSError as err:  # ELOOP (a symlink loop), ENAMETOOLONG, EACCES, ...
            raise UsageError(f"--out {path} cannot be used ({err.strerror}); remove it or choose another "
                             "--out") from None
        if path.is_dir():
            raise UsageError(f"--out {path} is a folder, not a results file; give --out FOLDER/NAME.json")
        if not path.is_file():
            raise UsageError(f"--out {path} is not a regular file; choose another --out")
