"""The table of `iat reproduce`, computed: every cell's run directory read back, means and spreads over
seeds, paired claim checks with fixed verdict rules, as one `Table` (a JSON-ready dict; render_table.py
writes it as Markdown/CSV/JSON, draws its plots and pastes it into the docs)."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TypedDict

from ..records import MetricLine, try_read_eval
from ..training.monitor import co_epochs
from .runner import eval_path, read_records, run_dir
from .spec import Compare, TableSpec
from .sweeps import sweep_points

MeanStd = tuple[Optional[float], Optional[float]]  # mean and sample standard deviation; (None, None): no values


class CheckpointEval(TypedDict):
    """One checkpoint of a run: the first eval group's record, each column's accuracy and its protocol."""

    epoch: Optional[int]
    threat: dict[str, Any]
    data: dict[str, Any]
    acc: dict[str, float]  # column -> accuracy in [0, 1]
    columns: dict[str, dict[str, Any]]  # column -> protocol, number of examples, the parts it was attacked in


class CellRun(TypedDict):
    """One finished run (a cell's seed) as read back from its run directory."""

    records: list[MetricLine]
    evals: dict[str, CheckpointEval]  # checkpoint kind -> its evaluations
    epoch_seconds: float
    images_per_second: float
    co_epochs: list[int]
    best_epoch: Optional[int]
    epochs: int


Cells = dict[str, dict[int, CellRun]]  # cell name -> seed -> its finished run


class Row(TypedDict):
    """One cell at one checkpoint kind: per column the accuracy (%) over seeds and each seed's in [0, 1]."""

    cell: str
    checkpoint: str
    seeds: list[int]
    acc: dict[str, MeanStd]
    per_seed: dict[str, dict[int, float]]
    epochs: list[Optional[int]]
    epoch_seconds: MeanStd
    co: dict[int, list[int]]


class Diff(TypedDict):
    """Ours - base in points for one column, paired by seed; wins: seeds where ours is higher."""

    mean: Optional[float]
    std: Optional[float]
    wins: int
    seeds: int


class Claim(TypedDict):
    """A spec's `[[compare]]` entry measured: the paired differences per checkpoint kind and column, the verdict."""

    claim: str
    base: str
    ours: str
    kind: str
    robust_column: str
    by_checkpoint: dict[str, dict[str, Diff]]
    unattackable_seeds: list[int]
    verdict: str


class Protocol(TypedDict):
    """The threat model and data of the first evaluation, and each column's protocol."""

    threat: dict[str, Any]
    data: dict[str, Any]
    columns: dict[str, dict[str, Any]]


class Table(TypedDict):
    """The whole table; table.json is this without `curves` (the cells' metrics.jsonl records)."""

    table: str
    title: str
    spec: str
    seeds: list[int]
    columns: list[str]
    rows: list[Row]
    protocol: Optional[Protocol]
    complete: bool
    missing: list[str]
    config: dict[str, Any]
    cells: dict[str, dict[str, Any]]
    claims: list[Claim]
    sweeps: list[dict[str, Any]]
    curves: dict[str, dict[int, list[MetricLine]]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mean_std(values: Sequence[float]) -> MeanStd:
    if not values:
        return None, None
    mean = _mean(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def read_cell(run: Path, spec: TableSpec) -> Optional[CellRun]:
    """One finished run: accuracies per checkpoint (from every eval group), time per epoch, CO flags, curves."""
    records = read_records(run)
    if not records:
        return None
    evals: dict[str, CheckpointEval] = {}
    for kind in spec.checkpoints:
        acc: dict[str, float] = {}
        columns: dict[str, dict[str, Any]] = {}
        first = None  # the first eval group's record: the checkpoint's epoch, threat model and data
        for group in spec.evals:
            result = try_read_eval(eval_path(run, kind, group))
            if result is None or group.n_examples not in (None, result.data.get("n_examples")):
                continue  # missing, or on other examples than the spec's (not yet extended): not counted
            for r in result.results:
                own = r.get("counted", "own") in ("own", "natural") and r["attack"] != "worst case"
                if (own or (r["attack"] == "worst case" and group is spec.evals[0])) and r["attack"] not in acc:
                    acc[r["attack"]] = r["accuracy"]
                    columns[r["attack"]] = {"protocol": r["protocol"], "n": result.data["n_examples"],
                                            "parts": [part["examples"] for part in result.parts]}
            if group is spec.evals[0]:
                first = result
        if first is not None:
            evals[kind] = CheckpointEval(epoch=first.checkpoint_epoch, threat=first.threat, data=first.data, acc=acc,
                                         columns=columns)
    seconds = [r.epoch_seconds for r in records if r.epoch_seconds is not None]
    return CellRun(records=records, evals=evals, epoch_seconds=sum(seconds) / max(1, len(seconds)),
                   images_per_second=sum(r.images_per_second or 0 for r in records) / len(records),
                   co_epochs=[epoch for epoch, _ in co_epochs(records)],  # the current rule, on the recorded curves
                   best_epoch=records[-1].best_epoch, epochs=records[-1].epoch)


def table_columns(spec: TableSpec) -> list[str]:
    """Every eval group's attacks in spec order (each once), then the per-example worst case."""
    columns = [c for g in spec.evals for c in g.columns()]
    return list(dict.fromkeys(columns)) + ["worst case"]


def _row(cell: str, kind: str, runs: dict[int, CellRun], columns: Sequence[str]) -> Row:
    """One cell at one checkpoint kind over the seeds that have it."""
    per_seed = {column: {s: r["evals"][kind]["acc"][column] for s, r in runs.items()
                         if kind in r["evals"] and column in r["evals"][kind]["acc"]} for column in columns}
    seeds = sorted(s for s, r in runs.items() if kind in r["evals"])
    return Row(cell=cell, checkpoint=kind, seeds=seeds,
               acc={column: _mean_std([100 * v for v in per_seed[column].values()]) for column in columns},
               per_seed=per_seed, epochs=[runs[s]["evals"][kind]["epoch"] for s in seeds],
               epoch_seconds=_mean_std([r["epoch_seconds"] for r in runs.values()]),
               co={s: r["co_epochs"] for s, r in runs.items()})


def build_table(spec: TableSpec, out: Path) -> Table:
    """The table of the finished runs under `out` (`OUT/<cell>/seed<k>`): a run that has not trained every epoch
    of the spec is left out (and named in `missing`).

    Args:
        spec: the table's spec (cells, seeds, evaluations, claims, sweeps).
        out: the folder of the cells' run directories.

    Returns:
        The rows (cell x checkpoint kind), the claims with their verdicts, the sweeps' points and the curves.
    """
    cells: Cells = {}
    for cell in spec.cells:
        for seed in spec.seeds:
            data = read_cell(run_dir(out, cell, seed), spec)
            if data is not None and data["epochs"] == spec.train_config(cell, seed).optim.epochs:
                cells.setdefault(cell.name, {})[seed] = data
    columns = table_columns(spec)
    rows = [_row(c.name, kind, cells.get(c.name, {}), columns) for c in spec.cells for kind in spec.checkpoints]
    missing = [f"{c.name}/seed{s}" for c in spec.cells for s in spec.seeds if s not in cells.get(c.name, {})]
    return Table(table=spec.name, title=spec.title, spec=spec.source, seeds=spec.seeds, columns=columns, rows=rows,
                 protocol=_protocol(cells),
                 complete=all(len(cells.get(c.name, {})) == len(spec.seeds) for c in spec.cells), missing=missing,
                 config=spec.config, cells={c.name: c.settings for c in spec.cells},
                 claims=[compare_cells(cmp, rows, cells, spec) for cmp in spec.compare],
                 sweeps=[sweep_points(rows, spec, sweep) for sweep in spec.sweeps],
                 curves={name: {s: r["records"] for s, r in runs.items()} for name, runs in cells.items()})


def _protocol(cells: Cells) -> Optional[Protocol]:
    """Threat model, data and each column's protocol (the first evaluation's); for a column that some evaluations
    hold in parts (`iat eval --extend`), how many of its evaluations had each split."""
    protocol: Optional[Protocol] = None
    evals: Counter[str] = Counter()
    for ev in (ev for runs in cells.values() for r in runs.values() for ev in r["evals"].values()):
        protocol = protocol or Protocol(threat=ev["threat"], data=ev["data"], columns={})
        for name, col in ev["columns"].items():
            column = protocol["columns"].setdefault(name, {"protocol": col["protocol"], "n": col["n"]})
            evals[name] += 1
            if col["parts"]:
                split = " and ".join(f"{a}-{b - 1}" for a, b in col["parts"])
                column.setdefault("in_parts", Counter())[split] += 1
    for name, column in (protocol["columns"] if protocol else {}).items():
        if "in_parts" in column:
            column.update(in_parts=dict(column["in_parts"]), evals=evals[name])
    return protocol


def _diff(base: Row, ours: Row, column: str) -> Diff:
    seeds = sorted(set(base["per_seed"][column]) & set(ours["per_seed"][column]))
    d = [100 * (ours["per_seed"][column][s] - base["per_seed"][column][s]) for s in seeds]
    mean, std = _mean_std(d)
    return Diff(mean=mean, std=std, wins=sum(v > 0 for v in d), seeds=len(d))


def compare_cells(cmp: Compare, rows: Sequence[Row], cells: Cells, spec: TableSpec) -> Claim:
    """Paired by seed: ours - base for every column and checkpoint, and a verdict from fixed rules."""
    columns = table_columns(spec)
    robust = "worst case"
    by_checkpoint = {}
    for kind in spec.checkpoints:
        base = next(r for r in rows if r["cell"] == cmp.base and r["checkpoint"] == kind)
        ours = next(r for r in rows if r["cell"] == cmp.ours and r["checkpoint"] == kind)
        by_checkpoint[kind] = {column: _diff(base, ours, column) for column in columns}
    last = next(r for r in rows if r["cell"] == cmp.ours and r["checkpoint"] == spec.checkpoints[-1])
    out = Claim(claim=cmp.claim, base=cmp.base, ours=cmp.ours, kind=cmp.kind, robust_column=robust,
                by_checkpoint=by_checkpoint, unattackable_seeds=unattackable_seeds(last, robust), verdict="")
    out["verdict"] = _verdict(out, cmp, cells, len(spec.seeds))
    return out


def unattackable_seeds(row: Row, robust: str) -> list[int]:
    """Seeds whose model no attack changed on any example (worst case = natural accuracy, above 0): at the
    table's eps that is a constant or otherwise degenerate classifier, whose "robust" accuracy is only its
    natural one. A cell that "avoids" catastrophic overfitting this way does not count as avoiding it."""
    nat, worst = row["per_seed"].get("natural", {}), row["per_seed"].get(robust, {})
    return sorted(s for s in nat if s in worst and nat[s] > 0 and worst[s] == nat[s])


def _verdict(result: Claim, cmp: Compare, cells: Cells, n_seeds: int) -> str:
    """Rules, fixed before any run: a gain must hold in every seed (paired), natural accuracy may drop at
    most 1 point on average; for overfitting, `ours` must have no CO flag where `base` has some. No
    verdict until both cells have every seed of the table."""
    best = result["by_checkpoint"].get("best") or next(iter(result["by_checkpoint"].values()))
    rob, nat = best[result["robust_column"]], best.get("natural")
    rob_mean = rob["mean"]
    if not rob["seeds"] or rob_mean is None:  # no paired seed: no mean
        return "not measured yet"
    if rob["seeds"] < n_seeds:
        return f"no verdict yet: {rob['seeds']} of {n_seeds} seeds finished in both cells"
    if cmp.kind == "overfitting":
        co_base = sum(bool(r["co_epochs"]) for r in cells.get(cmp.base, {}).values())
        co_ours = sum(bool(r["co_epochs"]) for r in cells.get(cmp.ours, {}).values())
        n = len(cells.get(cmp.ours, {}))
        if co_base == 0:
            return f"untested: {cmp.base} did not overfit catastrophically in any seed here"
        degenerate = result.get("unattackable_seeds", [])
        holds = co_ours == 0 and not degenerate
        seconds = {name: _mean([r["epoch_seconds"] for r in cells[name].values()]) for name in (cmp.ours, cmp.base)}
        ratio = seconds[cmp.ours] / seconds[cmp.base]
        return (f"{'holds' if holds else 'does not hold'}: catastrophic overfitting in {co_base}/"
                f"{len(cells[cmp.base])} seeds of {cmp.base}, {co_ours}/{n} of {cmp.ours}; wall time per epoch "
                f"{ratio:.2f}x {cmp.base}'s (shared machine)"
                + (f"; in {len(degenerate)}/{n} seeds of {cmp.ours} no attack changed any prediction at the last "
                   "checkpoint (a degenerate model: robust = natural accuracy)" if degenerate else ""))
    nat_mean = float("nan") if nat is None else nat["mean"]
    gain = rob_mean > 0 and rob["wins"] == rob["seeds"]
    kept = nat_mean is None or math.isnan(nat_mean) or nat_mean >= -1.0
    word = "holds" if gain and kept else "mixed" if rob_mean > 0 else "does not hold"
    return (f"{word}: {result['robust_column']} {rob_mean:+.2f} points (higher in {rob['wins']}/{rob['seeds']} "
            f"seeds), natural {nat_mean:+.2f} points, best checkpoints")
