"""`iat reproduce TABLE`: train and evaluate every cell (method x seed) of an experiment table, then write it.

A table is a TOML spec (built-in ones live in iat/experiments/, `iat reproduce --list` names them; a path to
your own file works the same). Every cell is an ordinary run directory OUT/<cell>/seed<k> made by the
`iat train` and `iat eval` commands the runner prints and runs as subprocesses, so a user can inspect,
evaluate or report any cell by hand. Running the same command again continues where it stopped: finished
cells are skipped, an interrupted training run is resumed from its last checkpoint, and only missing
evaluations are computed. A cell whose saved settings differ from the spec is never overwritten: the
runner stops and names the first differing setting.

The table (table.md/.csv/.json, curves.png) gives each cell's mean and spread over seeds for the best and
the last checkpoint, wall time per epoch, catastrophic-overfitting flags, and each claim's paired
comparison, all read from the run directories; `--results-md FILE` also pastes it into FILE between
markers, so documentation never holds a number typed by hand.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import dataclasses
import io
import json
import math
import os
import queue
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import config as C
from .checkpoint import atomic_write_bytes, atomic_write_text
from .monitor import co_epochs
from .registry import UsageError
from .tables import fmt_eps

SPEC_DIR = Path(__file__).parent / "experiments"
KINDS = ("best", "last")
METRICS = ("natural", "pgd20", "cw", "autoattack")
BEGIN, END = "<!-- iat reproduce {}: begin (generated; do not edit) -->", "<!-- iat reproduce {}: end -->"


@dataclasses.dataclass
class Cell:
    name: str
    settings: dict[str, Any]  # dotted config keys -> values, applied over the table's config


@dataclasses.dataclass
class Compare:
    claim: str
    base: str
    ours: str
    kind: str = "robust"  # "robust": accuracy comparison; "overfitting": CO flags and last-epoch robustness


@dataclasses.dataclass
class EvalGroup:
    """One `iat eval` per checkpoint: its attacks on the first n test examples, saved as eval-<ckpt>[-name].json.
    `late` groups (AutoAttack) run after every cell has trained, so a partial run still yields whole tables."""
    attacks: str
    n_examples: Optional[int] = None
    name: str = ""
    late: bool = False

    def columns(self) -> list[str]:
        return [a for a in self.attacks.split(",") if a]


@dataclasses.dataclass
class TableSpec:
    name: str
    title: str
    seeds: list[int]
    config: dict[str, Any]
    cells: list[Cell]
    evals: list[EvalGroup] = dataclasses.field(default_factory=lambda: [EvalGroup("natural,pgd20,cw")])
    checkpoints: tuple[str, ...] = KINDS
    compare: list[Compare] = dataclasses.field(default_factory=list)
    notes: str = ""
    source: str = ""

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def train_config(self, cell: Cell, seed: int) -> C.TrainConfig:
        cfg = C.from_dict(self.config)
        for key, value in cell.settings.items():
            if key == "method_options":
                cfg.method_options = dict(cfg.method_options, **value)
            else:
                C.set_path(cfg, key, value)
        cfg.seed = seed
        cfg.progress = False
        return cfg


def builtin_tables() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.toml"))}


def load_spec(name: str) -> TableSpec:
    """A built-in table by name, or a TOML spec file by path; every cell's config is checked here."""
    path = Path(name)
    if not path.is_file():
        tables = builtin_tables()
        if name not in tables:
            raise UsageError(f"no table {name!r}: give a spec file or one of {', '.join(tables)} (iat reproduce --list)")
        path = tables[name]
    raw = C.read_config_file(path)
    known = {"title", "seeds", "config", "cells", "evals", "checkpoints", "compare", "notes"}
    if set(raw) - known:
        raise UsageError(f"{path}: unknown keys {sorted(set(raw) - known)}; a table spec has {sorted(known)}")
    try:
        cells = [Cell(c.pop("name"), c) for c in (dict(c) for c in raw["cells"])]
        evals = [EvalGroup(**e) for e in raw.get("evals", [{"attacks": "natural,pgd20,cw"}])]
        spec = TableSpec(
            name=path.stem, title=raw.get("title", path.stem), seeds=[int(s) for s in raw.get("seeds", [0])],
            config=raw["config"], cells=cells, evals=evals, checkpoints=tuple(raw.get("checkpoints", KINDS)),
            compare=[Compare(**c) for c in raw.get("compare", [])], notes=raw.get("notes", ""), source=str(path))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path}: malformed table spec ({type(err).__name__}: {err})") from None
    names = [c.name for c in spec.cells]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{path}: cells need distinct names, got {names}")
    groups = [g.name for g in spec.evals]
    if len(set(groups)) != len(groups) or not groups or spec.evals[0].late:
        raise UsageError(f"{path}: evals need distinct names and a first group that is not late, got {groups}")
    if not set(spec.checkpoints) <= set(KINDS):
        raise UsageError(f"{path}: eval.checkpoints must be among {KINDS}, got {list(spec.checkpoints)}")
    for cmp in spec.compare:
        if {cmp.base, cmp.ours} - set(names) or cmp.kind not in ("robust", "overfitting"):
            raise UsageError(f"{path}: compare {cmp} names an unknown cell or kind (robust|overfitting)")
    for cell in spec.cells:  # unknown keys and bad values fail now, not an hour into the run
        try:
            spec.train_config(cell, spec.seeds[0])
        except UsageError as err:
            raise UsageError(f"{path}: cell {cell.name!r}: {err}") from None
    return spec


# ----------------------------------------------------------------------------------------------------------
# Cells: state on disk and the commands that advance them


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / cell.name / f"seed{seed}"


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]} (saved {a!r}, table {b!r})"


def train_state(run: Path, cfg: C.TrainConfig) -> str:
    """'new', 'partial' (resume it) or 'done'; a run made with other settings is an error."""
    saved_path = run / "config.json"
    if not saved_path.is_file():
        return "partial" if (run / "checkpoints" / "last.safetensors").is_file() else "new"
    saved = json.loads(saved_path.read_text())["config"]
    mine = json.loads(json.dumps(C.to_dict(cfg)))  # tuples become lists, as in the saved file
    ignore = ("progress", "device")  # how it ran, not what it computes
    diff = _first_difference({k: v for k, v in saved.items() if k not in ignore},
                             {k: v for k, v in mine.items() if k not in ignore})
    if diff:
        raise UsageError(f"{run} was trained with other settings than the table asks: {diff}; "
                         "move it away (or use another --out) to train the table's cell")
    records = _records(run)
    done = records and records[-1].get("epoch") == cfg.optim.epochs and (run / "checkpoints" / "last.safetensors").is_file()
    return "done" if done else "partial"


def eval_path(run: Path, kind: str, group: EvalGroup) -> Path:
    return run / f"eval-{kind}{'-' + group.name if group.name else ''}.json"


def checkpoint_epochs(run: Path) -> dict[str, int]:
    records = _records(run)
    return {"best": records[-1]["best_epoch"], "last": records[-1]["epoch"]} if records else {}


def eval_done(run: Path, kind: str, group: EvalGroup) -> bool:
    """An eval of the checkpoint as it is now, with every attack and the number of examples the group asks."""
    try:
        result = json.loads(eval_path(run, kind, group).read_text())
        epoch = checkpoint_epochs(run)[kind]
    except (OSError, ValueError, KeyError):
        return False
    attacks = {r["attack"] for r in result.get("results", [])}
    n = group.n_examples
    return (result.get("checkpoint_epoch") == epoch and set(group.columns()) <= attacks
            and (n is None or result.get("data", {}).get("n_examples") == n))


@dataclasses.dataclass
class Step:
    log: str
    argv: list[str]  # after `iat`
    copy_to: Optional[Path] = None  # also save the eval as this (the best checkpoint is the last one)
    done: Optional[tuple[str, EvalGroup]] = None  # (checkpoint, group): skip the step if that eval exists by then


def plan_steps(spec: TableSpec, out: Path, cell: Cell, seed: int, state: str, late: bool) -> list[Step]:
    """What this cell still needs: training (early phase), then its evals of the early or the late phase."""
    run = run_dir(out, cell, seed)
    steps = []
    if not late and state == "new":
        cfg_file = out / "configs" / f"{cell.name}-seed{seed}.json"
        steps.append(Step("train", ["train", "--config", str(cfg_file), "--out", str(run), "--no-progress"]))
    elif not late and state == "partial":
        steps.append(Step("train", ["train", "--resume", str(run), "--no-progress"]))
    for group in (g for g in spec.evals if g.late == late):
        # the last checkpoint first: when the best one is the same epoch (same weights), its eval is copied
        kinds = [k for k in sorted(spec.checkpoints, key=KINDS[::-1].index)
                 if state != "done" or not eval_done(run, k, group)]
        for kind in kinds:
            argv = ["eval", str(run), "--checkpoint", kind, "--attacks", group.attacks, "--no-progress",
                    "--out", str(eval_path(run, kind, group))]
            if group.n_examples is not None:
                argv += ["--n-examples", str(group.n_examples)]
            copy = eval_path(run, "best", group) if kind == "last" and "best" in spec.checkpoints else None
            steps.append(Step(f"eval-{kind}{'-' + group.name if group.name else ''}", argv, copy, (kind, group)))
    return steps


def _copy_if_same(run: Path, step: Step) -> None:
    """After the last checkpoint's eval: if the best checkpoint is the same epoch, its eval is this one."""
    epochs = checkpoint_epochs(run)
    if step.copy_to is None or epochs.get("best") != epochs.get("last"):
        return
    src = Path(step.argv[step.argv.index("--out") + 1])
    result = json.loads(src.read_text())
    result.update(checkpoint_kind="best", checkpoint=str(run / "checkpoints" / "best.safetensors"),
                  same_weights_as=src.name)
    atomic_write_text(step.copy_to, json.dumps(result, indent=1))


def _run_cell(out: Path, ident: str, run: Path, steps: list[Step], threads: int,
              gpus: Optional[queue.Queue] = None) -> tuple[str, float, str]:
    """Run a cell's steps, each logged to OUT/logs; returns (cell id, seconds, error or '').
    With `gpus`, the cell takes one GPU id from the queue for all its steps and gives it back."""
    gpu = gpus.get() if gpus is not None else None
    try:
        return _run_steps(out, ident, run, steps, threads, gpu)
    finally:
        if gpus is not None:
            gpus.put(gpu)


def _run_steps(out: Path, ident: str, run: Path, steps: list[Step], threads: int,
               gpu: Optional[str]) -> tuple[str, float, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.perf_counter()
    for step in steps:
        if step.done and eval_done(run, *step.done):
            continue  # the best checkpoint is the last one, whose eval was just copied
        log = out / "logs" / f"{ident.replace('/', '-')}-{step.log}.log"
        with log.open("a") as f:
            f.write(f"$ iat {shlex.join(step.argv)}\n")
            f.flush()
            code = subprocess.call([sys.executable, "-m", "iat", *step.argv], stdout=f, stderr=subprocess.STDOUT,
                                   env=env)
        if code != 0:
            tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
            return ident, time.perf_counter() - t0, f"`iat {step.argv[0]}` exited {code}: {' '.join(tail)} (log: {log})"
        _copy_if_same(run, step)
    return ident, time.perf_counter() - t0, ""


def run_table(spec: TableSpec, out: Path, jobs: int = 1, threads: Optional[int] = None,
              dry_run: bool = False, gpus: Optional[list[str]] = None) -> list[str]:
    """Advance every cell: first training and the early evals of all cells, then the late evals.
    Returns the failures (one line each)."""
    failures: list[str] = []
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    for late in (False, True):
        plan = []
        for cell in spec.cells:
            for seed in spec.seeds:
                cfg = spec.train_config(cell, seed)
                run = run_dir(out, cell, seed)
                state = train_state(run, cfg)
                if late and state != "done":
                    continue  # its training failed in the early phase (reported there)
                steps = plan_steps(spec, out, cell, seed, state, late)
                if steps:
                    plan.append((f"{cell.name}/seed{seed}", run, cfg, state, steps))
        phase = "late evaluations" if late else "training and evaluation"
        print(f"iat reproduce {spec.name} ({phase}): {len(plan)} of {len(spec.cells) * len(spec.seeds)} cells "
              f"have work in {out}", file=sys.stderr)
        for _, _, _, _, steps in plan:
            for step in steps:
                print(f"  iat {shlex.join(step.argv)}", file=sys.stderr)
        if dry_run or not plan:
            continue
        (out / "configs").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        for ident, run, cfg, state, _ in plan:
            cfg_file = out / "configs" / f"{ident.replace('/', '-')}.json"
            if state == "new":
                atomic_write_text(cfg_file, json.dumps(C.to_dict(cfg), indent=1))
        from tqdm import tqdm

        with futures.ThreadPoolExecutor(max_workers=jobs) as pool, \
                tqdm(total=len(plan), desc=phase, unit="cell") as bar:
            free = None
            if gpus:
                free = queue.Queue()
                for gpu in gpus:
                    free.put(gpu)
            pending = [pool.submit(_run_cell, out, ident, run, steps, threads, free)
                       for ident, run, _, _, steps in plan]
            for job in futures.as_completed(pending):
                ident, seconds, error = job.result()
                bar.update()
                bar.write(f"{ident}: {'FAILED ' + error if error else 'done'} ({seconds / 60:.1f} min)")
                if error:
                    failures.append(f"{ident}: {error}")
    return failures


# ----------------------------------------------------------------------------------------------------------
# The table: read every cell's run directory and aggregate over seeds


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def read_cell(run: Path, spec: TableSpec) -> Optional[dict[str, Any]]:
    """One finished run: accuracies per checkpoint (from every eval group), time per epoch, CO flags, curves."""
    records = _records(run)
    if not records:
        return None
    evals = {}
    for kind in spec.checkpoints:
        acc, columns = {}, {}
        for group in spec.evals:
            try:
                result = json.loads(eval_path(run, kind, group).read_text())
            except (OSError, ValueError):
                continue
            for r in result["results"]:
                own = r.get("counted", "own") in ("own", "natural") and r["attack"] != "worst case"
                if (own or (r["attack"] == "worst case" and group is spec.evals[0])) and r["attack"] not in acc:
                    acc[r["attack"]] = r["accuracy"]
                    columns[r["attack"]] = {"protocol": r["protocol"], "n": result["data"]["n_examples"]}
            if group is spec.evals[0]:
                evals[kind] = {"epoch": result.get("checkpoint_epoch"), "threat": result["threat"],
                               "data": result["data"]}
        if kind in evals:
            evals[kind].update(acc=acc, columns=columns)
    seconds = [r["epoch_seconds"] for r in records if "epoch_seconds" in r]
    return {"records": records, "evals": evals, "epoch_seconds": sum(seconds) / max(1, len(seconds)),
            "images_per_second": sum(r.get("images_per_second", 0) for r in records) / len(records),
            "co_epochs": [epoch for epoch, _ in co_epochs(records)],  # the current rule, on the recorded curves
            "best_epoch": records[-1].get("best_epoch"), "epochs": records[-1]["epoch"]}


def table_columns(spec: TableSpec) -> list[str]:
    columns = [c for g in spec.evals for c in g.columns()]
    return list(dict.fromkeys(columns)) + ["worst case"]


def build_table(spec: TableSpec, out: Path) -> dict[str, Any]:
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for cell in spec.cells:
        for seed in spec.seeds:
            data = read_cell(run_dir(out, cell, seed), spec)
            if data is not None and data["epochs"] == spec.train_config(cell, seed).optim.epochs:
                cells.setdefault(cell.name, {})[seed] = data
    columns = table_columns(spec)
    rows = []
    for cell in spec.cells:
        runs = cells.get(cell.name, {})
        for kind in spec.checkpoints:
            row = {"cell": cell.name, "checkpoint": kind, "seeds": [], "acc": {}, "per_seed": {}}
            for column in columns:
                per_seed = {s: r["evals"][kind]["acc"][column] for s, r in runs.items()
                            if kind in r["evals"] and column in r["evals"][kind]["acc"]}
                row["per_seed"][column] = per_seed
                row["acc"][column] = _mean_std([100 * v for v in per_seed.values()])
            row["seeds"] = sorted(s for s, r in runs.items() if kind in r["evals"])
            row["epochs"] = [runs[s]["evals"][kind]["epoch"] for s in row["seeds"]]
            row["epoch_seconds"] = _mean_std([r["epoch_seconds"] for r in runs.values()])
            row["co"] = {s: r["co_epochs"] for s, r in runs.items()}
            rows.append(row)
    protocol = None
    for runs in cells.values():
        for r in runs.values():
            for ev in r["evals"].values():
                if protocol is None:
                    protocol = {"threat": ev["threat"], "data": ev["data"], "columns": {}}
                for name, col in ev["columns"].items():
                    protocol["columns"].setdefault(name, col)
    table = {"table": spec.name, "title": spec.title, "spec": spec.source, "seeds": spec.seeds, "columns": columns,
             "rows": rows, "protocol": protocol, "complete": all(len(cells.get(c.name, {})) == len(spec.seeds)
                                                                 for c in spec.cells),
             "missing": [f"{c.name}/seed{s}" for c in spec.cells for s in spec.seeds if s not in cells.get(c.name, {})],
             "config": spec.config, "cells": {c.name: c.settings for c in spec.cells}}
    table["claims"] = [compare_cells(cmp, rows, cells, spec) for cmp in spec.compare]
    table["curves"] = {name: {s: r["records"] for s, r in runs.items()} for name, runs in cells.items()}
    return table


def compare_cells(cmp: Compare, rows: list[dict[str, Any]], cells: dict[str, Any], spec: TableSpec) -> dict[str, Any]:
    """Paired by seed: ours - base for every column and checkpoint, and a verdict from fixed rules."""
    columns = table_columns(spec)
    robust = "worst case"
    out = {"claim": cmp.claim, "base": cmp.base, "ours": cmp.ours, "kind": cmp.kind, "robust_column": robust,
           "by_checkpoint": {}}
    for kind in spec.checkpoints:
        base = next(r for r in rows if r["cell"] == cmp.base and r["checkpoint"] == kind)
        ours = next(r for r in rows if r["cell"] == cmp.ours and r["checkpoint"] == kind)
        diffs = {}
        for column in columns:
            seeds = sorted(set(base["per_seed"][column]) & set(ours["per_seed"][column]))
            d = [100 * (ours["per_seed"][column][s] - base["per_seed"][column][s]) for s in seeds]
            mean, std = _mean_std(d)
            diffs[column] = {"mean": mean, "std": std, "wins": sum(v > 0 for v in d), "seeds": len(d)}
        out["by_checkpoint"][kind] = diffs
    out["verdict"] = _verdict(out, cmp, cells, spec)
    return out


def _verdict(result: dict[str, Any], cmp: Compare, cells: dict[str, Any], spec: TableSpec) -> str:
    """Rules, fixed before any run: a gain must hold in every seed (paired), natural accuracy may drop at
    most 1 point on average; for overfitting, `ours` must have no CO flag where `base` has some."""
    best = result["by_checkpoint"].get("best") or next(iter(result["by_checkpoint"].values()))
    rob, nat = best[result["robust_column"]], best.get("natural", {})
    if not rob["seeds"]:
        return "not measured yet"
    if cmp.kind == "overfitting":
        co_base = sum(bool(r["co_epochs"]) for r in cells.get(cmp.base, {}).values())
        co_ours = sum(bool(r["co_epochs"]) for r in cells.get(cmp.ours, {}).values())
        n = len(cells.get(cmp.ours, {}))
        if co_base == 0:
            return f"untested: {cmp.base} did not overfit catastrophically in any seed here"
        holds = co_ours == 0
        cost = [r["epoch_seconds"] for r in cells[cmp.ours].values()], [r["epoch_seconds"] for r in cells[cmp.base].values()]
        ratio = (sum(cost[0]) / len(cost[0])) / (sum(cost[1]) / len(cost[1]))
        return (f"{'holds' if holds else 'does not hold'}: catastrophic overfitting in {co_base}/{len(cells[cmp.base])} "
                f"seeds of {cmp.base}, {co_ours}/{n} of {cmp.ours}; time per epoch {ratio:.2f}x {cmp.base}'s")
    gain = rob["mean"] > 0 and rob["wins"] == rob["seeds"]
    kept = nat.get("mean") is None or nat["mean"] >= -1.0
    word = "holds" if gain and kept else "mixed" if rob["mean"] > 0 else "does not hold"
    return (f"{word}: {result['robust_column']} {rob['mean']:+.2f} points (higher in {rob['wins']}/{rob['seeds']} "
            f"seeds), natural {nat.get('mean', float('nan')):+.2f} points, best checkpoints")


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(ms: tuple[Optional[float], Optional[float]], n: int) -> str:
    mean, std = ms
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _protocol_lines(table: dict[str, Any]) -> list[str]:
    from .tables import protocol_text

    p = table["protocol"]
    if not p:
        return []
    lines = [f"- test data: {p['data']['name']} ({p['data'].get('source', '')}); examples in the data set's fixed "
             f"order; threat model {p['threat']['norm']} eps {fmt_eps(p['threat']['eps'])}"]
    lines += [f"- {name} (first {c['n']} test examples): {protocol_text(c['protocol'])}"
              for name, c in p["columns"].items()]
    return lines


def to_markdown(table: dict[str, Any], curves: Optional[str], command: str) -> str:
    cols = table["columns"]
    lines = [f"### {table['title']}", "", f"Regenerate: `{command}`", ""]
    if not table["complete"]:
        lines += [f"**Incomplete**: no finished run for {', '.join(table['missing'])}.", ""]
    lines += ["Accuracy (%) on the test examples, mean ± sample standard deviation over seeds; "
              "`best` = epoch with the best PGD-10 accuracy on the held-out validation split, `last` = final epoch.", ""]
    head = ["cell", "ckpt", "seeds", *cols, "s/epoch", "CO epochs (per seed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        n = len(r["seeds"])
        co = "; ".join(f"s{s}: {','.join(map(str, e)) or '-'}" for s, e in sorted(r["co"].items()))
        epochs = f" (ep {','.join(map(str, r['epochs']))})" if r["checkpoint"] == "best" and r["epochs"] else ""
        lines.append("| " + " | ".join([r["cell"], r["checkpoint"] + epochs, str(n),
                                        *[_fmt(r["acc"][c], n) for c in cols],
                                        _fmt(r["epoch_seconds"], n), co]) + " |")
    lines += ["", "CO epochs: the epochs that the catastrophic-overfitting rule of `iat.monitor` (`co_rule`) flags "
              "on each run's recorded validation curves (PGD-10 against FGSM accuracy per epoch)."]
    if table["claims"]:
        lines += ["", "Claims, paired by seed (ours − base, points; best checkpoints decide the verdict):", ""]
        lines += ["| claim | ours vs base | ckpt | " + " | ".join(cols) + " | verdict |",
                  "|" + "---|" * (len(cols) + 4)]
        for c in table["claims"]:
            for kind, diffs in c["by_checkpoint"].items():
                cells = [f"{d['mean']:+.1f} ({d['wins']}/{d['seeds']})" if d["mean"] is not None else "-"
                         for d in (diffs[col] for col in cols)]
                verdict = c["verdict"] if kind == next(iter(c["by_checkpoint"])) else ""
                lines.append(f"| {c['claim']} | {c['ours']} vs {c['base']} | {kind} | " + " | ".join(cells)
                             + f" | {verdict} |")
        lines += ["", "(k/n): ours higher than base in k of n seeds."]
    lines += ["", "Protocol:", *_protocol_lines(table)]
    if curves:
        lines += ["", f"![validation curves]({curves})"]
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "cell", "checkpoint", "seed", *table["columns"]])
    for r in table["rows"]:
        for s in r["seeds"]:
            w.writerow([table["table"], r["cell"], r["checkpoint"], s,
                        *[r["per_seed"][c].get(s, "") for c in table["columns"]]])
    return buf.getvalue()


def paste_into(doc: Path, name: str, markdown: str) -> None:
    """Replace the table's generated block in `doc` (append it when the markers are not there yet)."""
    text = doc.read_text() if doc.is_file() else ""
    begin, end = BEGIN.format(name), END.format(name)
    block = f"{begin}\n{markdown}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(doc, text)


def write_table(spec: TableSpec, out: Path, results_md: Optional[Path], command: str, plots: bool = True) -> dict:
    table = build_table(spec, out)
    curves_name = None
    if plots and table["curves"]:
        from .plots import plot_seed_curves

        plot_seed_curves(table["curves"], out / "curves.png", title=spec.title)
        curves_name = "curves.png"
    atomic_write_text(out / "table.md", to_markdown(table, curves_name, command))
    atomic_write_text(out / "table.csv", to_csv(table))
    atomic_write_text(out / "table.json", json.dumps({k: v for k, v in table.items() if k != "curves"}, indent=1))
    if results_md is not None:
        image = None
        if curves_name:
            image_path = results_md.parent / "results" / f"{spec.name}-curves.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(image_path, (out / "curves.png").read_bytes())
            image = os.path.relpath(image_path, results_md.parent)
        paste_into(results_md, spec.name, to_markdown(table, image, command))
    return table


def run_reproduce(args: argparse.Namespace) -> int:
    if args.list or not args.table:
        tables = builtin_tables()
        width = max(map(len, tables))
        for name, path in tables.items():
            spec = load_spec(str(path))
            print(f"{name:<{width}}  {len(spec.cells)} cells x {len(spec.seeds)} seed(s)  {spec.title}")
        return 0
    spec = load_spec(args.table)
    if args.seeds:
        spec.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or Path("runs") / "reproduce" / spec.name)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    jobs = args.jobs if args.jobs is not None else len(gpus) if gpus else 1
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if gpus and jobs > len(gpus):
        raise UsageError(f"--jobs {jobs} is more than the {len(gpus)} GPUs of --gpus; each cell needs its own GPU")
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()
    failures = [] if args.table_only else run_table(spec, out, jobs, args.threads, args.dry_run, gpus)
    if args.dry_run:
        return 0
    command = f"iat reproduce {args.table}" + (f" --seeds {args.seeds}" if args.seeds else "")
    table = write_table(spec, out, Path(args.results_md) if args.results_md else None, command, not args.no_plots)
    print(f"iat reproduce {spec.name}: table in {out / 'table.md'}"
          + ("" if table["complete"] else f" (incomplete: {len(table['missing'])} cells missing)"), file=sys.stderr)
    for c in table["claims"]:
        print(f"  {c['claim']} {c['ours']} vs {c['base']}: {c['verdict']}", file=sys.stderr)
    for line in failures:
        print(f"iat: error: {line}", file=sys.stderr)
    return 1 if failures else 0
