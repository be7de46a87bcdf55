"""`iat report RUN_DIR...`: several runs side by side, like the paper's tables (best and last checkpoint),
and their training curves.

Numbers come from each run's eval-*.json files (what `iat eval` writes); with --eval-missing the
missing ones are computed first. Columns show each attack's own accuracy; the cumulative columns of a
--worst-case-only eval are left out (they count towards the worst case only). Files for the same
checkpoint are merged when they share the epoch, threat model, data and examples (the newest file's);
the worst case over the merged attacks is exact when the files carry per-example outcomes, else it is
the smallest file's worst case, an upper bound, marked with *.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import setting
from ..errors import UsageError
from ..evaluation.accuracy import unpack_flags
from ..extras import require_matplotlib
from ..records import EvalRecord, RunRecord, atomic_write_text, read_metrics, read_run, try_read_eval
from .eval_tables import protocol_text
from .plots import plot_training_curves
from .render import csv_text, fmt_eps, markdown_table

KINDS = ("best", "last")
EMA_KINDS = ("best-ema", "last-ema")  # the EMA weights' checkpoints (optim.ema_decay), reported when asked for
ROW_FIELDS = ["run", "method", "checkpoint", "epoch", "n", "threat"]
COLUMN_ORDER = ["natural", "fgsm", "pgd20", "pgd100", "cw", "autoattack"]


def read_evals(run: Path) -> dict[str, list[tuple[str, EvalRecord]]]:
    """checkpoint kind -> (file name, record) of its eval-*.json files, oldest first (unreadable ones skipped)."""
    out: dict[str, list[tuple[str, EvalRecord]]] = {}
    for path in sorted(run.glob("eval-*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        result = try_read_eval(path)
        if result is not None and result.checkpoint_kind in KINDS + EMA_KINDS:
            out.setdefault(result.checkpoint_kind, []).append((path.name, result))
    return out


def _key(result: EvalRecord) -> tuple:
    t, d = result.threat, result.data
    return (result.checkpoint_epoch, t["norm"], round(float(t["eps"]), 9), d["name"], d["n_examples"])


def merge_evals(files: list[tuple[str, EvalRecord]]) -> dict[str, Any]:
    """Merge one checkpoint's evals (file name, record) that share the newest one's epoch, threat and examples."""
    newest = files[-1][1]
    names = {id(r): name for name, r in files}
    results = [r for _, r in files]
    same = [r for r in results if _key(r) == _key(newest)]
    rows: dict[str, dict[str, Any]] = {}
    for r in same:  # a cumulative column is not its attack's own accuracy: it only feeds the worst case
        rows.update({row["attack"]: row for row in r.results
                     if row["attack"] != "worst case" and row.get("counted", "own") in ("own", "natural")})
    left_out = sorted({row["attack"] for r in same for row in r.results
                       if row["attack"] != "worst case" and row["attack"] not in rows})
    n = newest.data["n_examples"]
    flags = [f for r in same if (f := r.per_example.get("worst_case"))]
    if len(flags) == len(same):  # every file holds its per-example worst case: the merged one is exact
        worst = torch.stack([unpack_flags(f, n) for f in flags]).all(0)
        worst_correct, exact = int(worst.sum()), True
    else:
        worst_correct = min(row["correct"] for r in same for row in r.results if row["attack"] == "worst case")
        exact = len(same) == 1
    return {"rows": rows, "worst_case": worst_correct / n, "worst_exact": exact, "n": n,
            "epoch": newest.checkpoint_epoch, "threat": newest.threat, "files": [names[id(r)] for r in same],
            "ignored": [names[id(r)] for r in results if r not in same], "left_out": left_out}


def _label(run: Path, runs: list[Path]) -> str:
    names = [r.name for r in runs]
    return run.name if names.count(run.name) == 1 else f"{run.parent.name}/{run.name}"


def _dataset(config: RunRecord) -> str:
    """The run's data set as shown in a report: its name, and its number of classes where the record has it."""
    data = config.data or {}
    name = data.get("name") or (config.config.get("data") or {}).get("name") or "?"
    classes = data.get("num_classes") or (config.model or {}).get("num_classes")
    if classes is None and isinstance(data.get("classes"), list):
        classes = len(data["classes"])
    return f"{name} ({classes} classes)" if classes else str(name)


def load_run(run: Path, runs: list[Path]) -> dict[str, Any]:
    """One run directory: its config, metrics, merged evaluations per checkpoint and label."""
    if not (run / "config.json").is_file():
        raise UsageError(f"{run} is not an iat run directory (no config.json)")
    config = read_run(run / "config.json")
    records = read_metrics(run / "metrics.jsonl")
    evals = {kind: merge_evals(res) for kind, res in read_evals(run).items()}
    epochs = {"best": records[-1].best_epoch if records else None, "last": records[-1].epoch if records else None}
    epochs.update({"best-ema": records[-1].best_ema_epoch if records else None, "last-ema": epochs["last"]})
    for kind, other in (("last", "best"), ("best", "last")):  # one epoch, one set of weights: one eval for both
        if kind not in evals and other in evals and epochs[kind] is not None and evals[other]["epoch"] == epochs[kind]:
            evals[kind] = dict(evals[other], same_as=other)
    return {"path": str(run), "label": _label(run, runs), "method": (config.method or {}).get("name", "?"),
            "config": config, "records": records, "evals": evals, "epochs": epochs,
            "dataset": _dataset(config)}


def _columns(runs: list[dict[str, Any]]) -> list[str]:
    seen = {a for r in runs for e in r["evals"].values() for a in e["rows"]}
    return [c for c in COLUMN_ORDER if c in seen] + sorted(seen - set(COLUMN_ORDER))


def side_by_side(runs: list[dict[str, Any]], kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Rows: run x checkpoint; columns: attacks then the worst case; plus protocol legend and warnings."""
    columns = _columns(runs)
    datasets = list(dict.fromkeys(r.get("dataset", "?") for r in runs))
    mixed = len(datasets) > 1  # only then a data-set column: a report of one data set is unchanged
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    protocols: dict[str, set[str]] = {c: set() for c in columns}
    for run in runs:
        for kind in kinds:
            ev = run["evals"].get(kind)
            row = {"run": run["label"], "method": run["method"], "checkpoint": kind,
                   "epoch": ev["epoch"] if ev else run["epochs"][kind], "n": ev["n"] if ev else None,
                   "threat": f"{ev['threat']['norm']} {fmt_eps(ev['threat']['eps'])}" if ev else None, "acc": {}}
            if ev is None:
                notes.append(f"{run['label']}: no eval of the {kind} checkpoint; run `iat eval {run['path']} "
                             f"--checkpoint {kind}` or pass --eval-missing")
            else:
                for c in columns:
                    if c in ev["rows"]:
                        row["acc"][c] = ev["rows"][c]["accuracy"]
                        protocols[c].add(protocol_text(ev["rows"][c]["protocol"]))
                row["acc"]["worst case"] = ev["worst_case"]
                row["worst_exact"] = ev["worst_exact"]
                if ev.get("same_as"):
                    notes.append(f"{run['label']}: the {kind} checkpoint is the {ev['same_as']} one (epoch "
                                 f"{ev['epoch']}, the same weights); its row repeats that eval")
                if ev["left_out"]:
                    notes.append(f"{run['label']} {kind}: columns {', '.join(ev['left_out'])} left out: a "
                                 "--worst-case-only eval attacks only the points the attacks before it missed, so "
                                 "they count towards the worst case only")
                if ev["ignored"]:
                    notes.append(f"{run['label']} {kind}: ignored {', '.join(ev['ignored'])} (another epoch, "
                                 "threat model or set of examples than the newest eval)")
            if mixed:
                row["dataset"] = run.get("dataset", "?")
            rows.append(row)
    for c, texts in protocols.items():
        if len(texts) > 1:
            notes.append(f"column {c} mixes protocols, compare with care: {' | '.join(sorted(texts))}")
    if len({(r["n"], r["threat"]) for r in rows if r["n"]}) > 1:
        notes.append("rows were evaluated on different numbers of examples or threat models")
    table = {"columns": columns + ["worst case"], "rows": rows, "notes": notes,
             "protocols": {c: sorted(t) for c, t in protocols.items()}}
    if mixed:
        notes.append(f"the runs were trained on different data sets ({', '.join(datasets)}); their accuracies are "
                     "not comparable")
        table["datasets"] = datasets
    return table


def _fields(table: dict[str, Any]) -> list[str]:
    return ROW_FIELDS[:2] + ["data set"] + ROW_FIELDS[2:] if "datasets" in table else ROW_FIELDS


def _lead(r: dict[str, Any], table: dict[str, Any], empty: Any) -> list[Any]:
    lead = [r["run"], r["method"], r["checkpoint"], r["epoch"], r["n"] or empty, r["threat"] or empty]
    return lead[:2] + [r.get("dataset", "?")] + lead[2:] if "datasets" in table else lead


def _cell(row: dict[str, Any], col: str) -> str:
    if col not in row["acc"]:
        return "-"
    star = "*" if col == "worst case" and not row.get("worst_exact", True) else ""
    return f"{100 * row['acc'][col]:.2f}{star}"


def to_markdown(table: dict[str, Any], curves: Optional[str]) -> str:
    """The report as Markdown: the table, its protocols and notes, the curves image."""
    cols = table["columns"]
    rows = [[*_lead(r, table, "-"), *(_cell(r, c) for c in cols)] for r in table["rows"]]
    align = ("llllrrl" if "datasets" in table else "lllrrl") + "r" * len(cols)
    lines = ["# Runs side by side", "", "Robust accuracy (%) on the test split; best = the checkpoint with the best "
             "validation robust accuracy, last = the final epoch.", "",
             *markdown_table([*_fields(table), *cols], rows, align=align), "", "Protocols:", ""]
    lines += [f"- **{c}**: {'; '.join(t)}" for c, t in table["protocols"].items() if t]
    lines.append("- **worst case**: per example, worst over the columns of that row (* = upper bound: the evals "
                 "carried no per-example outcomes)")
    if table["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table["notes"]]
    if curves:
        lines += ["", f"![training curves]({curves})"]
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    """One CSV line per run and checkpoint, accuracies in [0, 1]."""
    rows = [[*_lead(r, table, ""), *(f"{r['acc'][c]:.6f}" if c in r["acc"] else "" for c in table["columns"])]
            for r in table["rows"]]
    return csv_text([*_fields(table), *table["columns"]], rows)


def _val_label(config: RunRecord) -> str:
    a = config.val_attack or {}
    return f"val PGD-{a['steps']}" if "steps" in a else "val robust"


@dataclasses.dataclass
class ReportConfig:
    """What `iat report` writes (flags are generated from these)."""

    runs: list[str] = setting(factory=list, help="run directories (their eval-*.json files are read)")
    out: str = setting("report", "folder for report.md/.csv/.json and curves.png")
    checkpoints: str = setting("best,last", "best, last or best,last (also best-ema, last-ema: the EMA weights)")
    eval_missing: bool = setting(False, "run `iat eval` first where a checkpoint has none")
    attacks: str = setting("natural,fgsm,pgd20,cw", "attacks for --eval-missing")
    n_examples: Optional[int] = setting(None, "for --eval-missing: first N test examples (default: all)")
    batch_size: int = setting(256, "for --eval-missing: examples per attack batch")
    data_dir: Optional[str] = setting(None, "for --eval-missing: data root folder")
    device: str = setting("auto", "for --eval-missing: auto, cpu, cuda or cuda:N")
    seed: int = setting(0, "for --eval-missing: seed of the attacks' random starts")
    plots: bool = setting(True, "draw curves.png (needs matplotlib)")
    progress: bool = setting(True, "progress bars")


def _eval_missing(runs: list[Path], kinds: tuple[str, ...], cfg: ReportConfig) -> None:
    from ..evaluation.pipeline import EvalConfig, evaluate_checkpoint
    from ..training.run_dir import run_lock
    from .eval_tables import write_eval_files

    for run in runs:
        have = read_evals(run)
        for kind in kinds:
            if kind not in have:
                ecfg = EvalConfig(checkpoint=kind, attacks=cfg.attacks, n_examples=cfg.n_examples,
                                  batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed,
                                  data_dir=cfg.data_dir, progress=cfg.progress)
                print(f"evaluating {run} ({kind}) ...")
                with run_lock(run / f"eval-{kind}.json"):  # the same lock as `iat eval --out`
                    write_eval_files(evaluate_checkpoint(str(run), ecfg), run / f"eval-{kind}.json")


def write_report(cfg: ReportConfig) -> list[Path]:
    """Read (and with eval_missing, first make) every run's evals; write the table, its curves and JSON."""
    paths = [Path(p) for p in cfg.runs]
    for p in paths:
        if not (p / "config.json").is_file():
            raise UsageError(f"{p} is not an iat run directory (no config.json)")
    kinds = tuple(k.strip() for k in cfg.checkpoints.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS + EMA_KINDS):
        raise UsageError(f"--checkpoints takes best, last, best-ema or last-ema, comma-separated; got "
                         f"{cfg.checkpoints!r}")
    if cfg.plots:
        require_matplotlib()
    from ..training.run_dir import check_writable

    check_writable(Path(cfg.out))  # before any evaluation, not after it
    if cfg.eval_missing:
        _eval_missing(paths, kinds, cfg)
    runs = [load_run(p, paths) for p in paths]
    table = side_by_side(runs, kinds)
    if "datasets" in table:
        print(f"iat report: warning: these runs were trained on different data sets ({', '.join(table['datasets'])}); "
              "their accuracies are not comparable", file=sys.stderr)
    out = Path(cfg.out)
    curves = None
    if cfg.plots and any(r["records"] for r in runs):
        legend = {(r["method"] if r["label"] == r["method"] else f"{r['method']} ({r['label']})"): r["records"]
                  for r in runs}  # the method's name first: folder names are often seed0, seed1, ...
        plot_training_curves(legend, out / "curves.png",
                             robust_label=_val_label(runs[0]["config"]))
        curves = "curves.png"
    markdown = to_markdown(table, curves)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.csv", to_csv(table))
    summary = {"runs": [{k: r[k] for k in ("path", "label", "method", "epochs")} for r in runs], **table,
               "curves": str(out / curves) if curves else None}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    print(markdown, end="")
    return [out / "report.md", out / "report.csv", out / "report.json"] + ([out / curves] if curves else [])
