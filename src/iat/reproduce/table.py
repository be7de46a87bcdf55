"""The table of `iat reproduce`: every cell's run directory read back, means and spreads over seeds,
paired claim checks with fixed verdict rules, Markdown/CSV/JSON and the curves plot."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from ..records import atomic_write_bytes, atomic_write_text, try_read_eval
from ..training.monitor import co_epochs
from ..reporting.eval_tables import fmt_eps
from ..reporting.render import csv_text, markdown_table
from .runner import eval_path, read_records, run_dir
from .spec import Compare, TableSpec
from .sweeps import sweep_points

BEGIN, END = "<!-- iat reproduce {}: begin (generated; do not edit) -->", "<!-- iat reproduce {}: end -->"


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def read_cell(run: Path, spec: TableSpec) -> Optional[dict[str, Any]]:
    """One finished run: accuracies per checkpoint (from every eval group), time per epoch, CO flags, curves."""
    records = read_records(run)
    if not records:
        return None
    evals = {}
    for kind in spec.checkpoints:
        acc, columns = {}, {}
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
                evals[kind] = {"epoch": result.checkpoint_epoch, "threat": result.threat, "data": result.data}
        if kind in evals:
            evals[kind].update(acc=acc, columns=columns)
    seconds = [r.epoch_seconds for r in records if r.epoch_seconds is not None]
    return {"records": records, "evals": evals, "epoch_seconds": sum(seconds) / max(1, len(seconds)),
            "images_per_second": sum(r.images_per_second or 0 for r in records) / len(records),
            "co_epochs": [epoch for epoch, _ in co_epochs(records)],  # the current rule, on the recorded curves
            "best_epoch": records[-1].best_epoch, "epochs": records[-1].epoch}


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
    table = {"table": spec.name, "title": spec.title, "spec": spec.source, "seeds": spec.seeds, "columns": columns,
             "rows": rows, "protocol": _protocol(cells), "complete": all(len(cells.get(c.name, {})) == len(spec.seeds)
                                                                 for c in spec.cells),
             "missing": [f"{c.name}/seed{s}" for c in spec.cells for s in spec.seeds if s not in cells.get(c.name, {})],
             "config": spec.config, "cells": {c.name: c.settings for c in spec.cells}}
    table["claims"] = [compare_cells(cmp, rows, cells, spec) for cmp in spec.compare]
    table["sweeps"] = [sweep_points(table, spec, sweep) for sweep in spec.sweeps]
    table["curves"] = {name: {s: r["records"] for s, r in runs.items()} for name, runs in cells.items()}
    return table


def _protocol(cells: dict[str, dict[int, dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Threat model, data and each column's protocol (the first evaluation's); for a column that some evaluations
    hold in parts (`iat eval --extend`), how many of its evaluations had each split."""
    protocol, evals = None, Counter()
    for ev in (ev for runs in cells.values() for r in runs.values() for ev in r["evals"].values()):
        protocol = protocol or {"threat": ev["threat"], "data": ev["data"], "columns": {}}
        for name, col in ev["columns"].items():
            column = protocol["columns"].setdefault(name, {"protocol": col["protocol"], "n": col["n"]})
            evals[name] += 1
            if col["parts"]:
                split = " and ".join(f"{a}-{b - 1}" for a, b in col["parts"])
                column.setdefault("in_parts", Counter())[split] += 1
    for name, column in (protocol or {}).get("columns", {}).items():
        if "in_parts" in column:
            column.update(in_parts=dict(column["in_parts"]), evals=evals[name])
    return protocol


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
    last = next(r for r in rows if r["cell"] == cmp.ours and r["checkpoint"] == spec.checkpoints[-1])
    out["unattackable_seeds"] = unattackable_seeds(last, robust)
    out["verdict"] = _verdict(out, cmp, cells, len(spec.seeds))
    return out


def unattackable_seeds(row: dict[str, Any], robust: str) -> list[Any]:
    """Seeds whose model no attack changed on any example (worst case = natural accuracy, above 0): at the
    table's eps that is a constant or otherwise degenerate classifier, whose "robust" accuracy is only its
    natural one. A cell that "avoids" catastrophic overfitting this way does not count as avoiding it."""
    nat, worst = row["per_seed"].get("natural", {}), row["per_seed"].get(robust, {})
    return sorted(s for s in nat if s in worst and nat[s] > 0 and worst[s] == nat[s])


def _verdict(result: dict[str, Any], cmp: Compare, cells: dict[str, Any], n_seeds: int) -> str:
    """Rules, fixed before any run: a gain must hold in every seed (paired), natural accuracy may drop at
    most 1 point on average; for overfitting, `ours` must have no CO flag where `base` has some. No
    verdict until both cells have every seed of the table."""
    best = result["by_checkpoint"].get("best") or next(iter(result["by_checkpoint"].values()))
    rob, nat = best[result["robust_column"]], best.get("natural", {})
    if not rob["seeds"]:
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
        seconds = {name: _mean_std([r["epoch_seconds"] for r in cells[name].values()])[0]
                   for name in (cmp.ours, cmp.base)}
        ratio = seconds[cmp.ours] / seconds[cmp.base]
        return (f"{'holds' if holds else 'does not hold'}: catastrophic overfitting in {co_base}/{len(cells[cmp.base])} "
                f"seeds of {cmp.base}, {co_ours}/{n} of {cmp.ours}; wall time per epoch {ratio:.2f}x {cmp.base}'s "
                "(shared machine)" + (f"; in {len(degenerate)}/{n} seeds of {cmp.ours} no attack changed any "
                                      "prediction at the last checkpoint (a degenerate model: robust = natural accuracy)"
                                      if degenerate else ""))
    gain = rob["mean"] > 0 and rob["wins"] == rob["seeds"]
    kept = nat.get("mean") is None or nat["mean"] >= -1.0
    word = "holds" if gain and kept else "mixed" if rob["mean"] > 0 else "does not hold"
    return (f"{word}: {result['robust_column']} {rob['mean']:+.2f} points (higher in {rob['wins']}/{rob['seeds']} "
            f"seeds), natural {nat.get('mean', float('nan')):+.2f} points, best checkpoints")


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(ms: tuple[Optional[float], Optional[float]], n: int) -> str:
    mean, std = ms
    return "-" if mean is None else f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _partial(row: dict[str, Any], column: str) -> str:
    """Marks a column measured on fewer seeds than the row (e.g. AutoAttack still running)."""
    k = len(row["per_seed"][column])
    return f" ({k} of {len(row['seeds'])} seeds)" if 0 < k < len(row["seeds"]) else ""


def _protocol_lines(table: dict[str, Any]) -> list[str]:
    from ..reporting.eval_tables import protocol_text

    p = table["protocol"]
    if not p:
        return []
    lines = [f"- test data: {p['data']['name']} ({p['data'].get('source', '')}); examples in the data set's fixed "
             f"order; threat model {p['threat']['norm']} eps {fmt_eps(p['threat']['eps'])}"]
    for name, c in p["columns"].items():
        grown = "".join(f"; examples {split} attacked in separate runs (`iat eval --extend`) in {k} of "
                        f"{c['evals']} evaluations" for split, k in c.get("in_parts", {}).items())
        lines.append(f"- {name} (first {c['n']} test examples): {protocol_text(c['protocol'])}{grown}")
    return lines


def _row_cells(r: dict[str, Any], cols: list[str]) -> list[str]:
    n = len(r["seeds"])
    co = "; ".join(f"s{s}: {','.join(map(str, e)) or '-'}" for s, e in sorted(r["co"].items()))
    epochs = f" (ep {','.join(map(str, r['epochs']))})" if r["checkpoint"] == "best" and r["epochs"] else ""
    return [r["cell"], r["checkpoint"] + epochs, str(n),
            *[_fmt(r["acc"][c], len(r["per_seed"][c])) + _partial(r, c) for c in cols], _fmt(r["epoch_seconds"], n), co]


def _claim_cells(c: dict[str, Any], cols: list[str]) -> list[list[str]]:
    """One row per checkpoint of a claim; the verdict on the first."""
    rows = []
    for kind, diffs in c["by_checkpoint"].items():
        cells = [f"{d['mean']:+.1f} ({d['wins']}/{d['seeds']})" if d["mean"] is not None else "-"
                 for d in (diffs[col] for col in cols)]
        verdict = c["verdict"] if kind == next(iter(c["by_checkpoint"])) else ""
        rows.append([c["claim"], f"{c['ours']} vs {c['base']}", kind, *cells, verdict])
    return rows


def to_markdown(table: dict[str, Any], images: list[tuple[str, str]], command: str) -> str:
    cols = table["columns"]
    lines = [f"### {table['title']}", "", f"Regenerate: `{command}`", ""]
    if not table["complete"]:
        lines += [f"**Incomplete**: no finished run for {', '.join(table['missing'])}.", ""]
    lines += ["Accuracy (%) on the test examples, mean ± sample standard deviation over seeds; "
              "`best` = epoch with the best PGD-10 accuracy on the held-out validation split, `last` = final epoch.", ""]
    lines += markdown_table(["cell", "ckpt", "seeds", *cols, "s/epoch", "CO epochs (per seed)"],
                            [_row_cells(r, cols) for r in table["rows"]])
    lines += ["", "CO epochs: the epochs that the catastrophic-overfitting rule of `iat.monitor` (`co_rule`) flags "
              "on each run's recorded validation curves (PGD-10 against FGSM accuracy per epoch)."]
    if table["claims"]:
        lines += ["", "Claims, paired by seed (ours − base, points; best checkpoints decide the verdict):", ""]
        lines += markdown_table(["claim", "ours vs base", "ckpt", *cols, "verdict"],
                                [cells for c in table["claims"] for cells in _claim_cells(c, cols)])
        lines += ["", "(k/n): ours higher than base in k of n seeds."]
    lines += ["", "Protocol:", *_protocol_lines(table)]
    for caption, image in images:
        lines += ["", f"![{caption}]({image})"]
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    """One line per run (cell x checkpoint x seed); CRLF line ends (the csv module's default, kept as committed)."""
    rows = [[table["table"], r["cell"], r["checkpoint"], s, *[r["per_seed"][c].get(s, "") for c in table["columns"]]]
            for r in table["rows"] for s in r["seeds"]]
    return csv_text(["table", "cell", "checkpoint", "seed", *table["columns"]], rows, lineterminator="\r\n")


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


def _draw(spec: TableSpec, table: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """The table's PNGs in `out`: (caption, file name) of the validation curves and of each sweep."""
    from ..reporting.plots import plot_option_sweep, plot_seed_curves

    images = []
    if table["curves"]:
        plot_seed_curves(table["curves"], out / "curves.png", title=spec.title)
        images.append(("validation curves", "curves.png"))
    for sweep, points in zip(spec.sweeps, table["sweeps"]):
        plot_option_sweep(points, out / f"sweep-{sweep.name}.png", title=f"{spec.title}: accuracy against {sweep.name}")
        images.append((f"accuracy against {sweep.name}", f"sweep-{sweep.name}.png"))
    return images


def write_table(spec: TableSpec, out: Path, results_md: Optional[Path], command: str, plots: bool = True) -> dict:
    table = build_table(spec, out)
    images = _draw(spec, table, out) if plots else []
    atomic_write_text(out / "table.md", to_markdown(table, images, command))
    atomic_write_text(out / "table.csv", to_csv(table))
    atomic_write_text(out / "table.json", json.dumps({k: v for k, v in table.items() if k != "curves"}, indent=1))
    if results_md is not None:
        linked = []
        for caption, name in images:  # beside the document, as results/<table>-<image>
            image_path = results_md.parent / "results" / f"{spec.name}-{name}"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(image_path, (out / name).read_bytes())
            linked.append((caption, os.path.relpath(image_path, results_md.parent)))
        paste_into(results_md, spec.name, to_markdown(table, linked, command))
    return table
