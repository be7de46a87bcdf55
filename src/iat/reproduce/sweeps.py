"""Accuracy against one setting across a table's cells (a `[[sweeps]]` entry of the spec): the points that
the table JSON records and the plot draws."""
from __future__ import annotations

from typing import Any

from .spec import Sweep, TableSpec, option_value


def _row(table: dict[str, Any], cell: str, kind: str) -> dict[str, Any]:
    return next(r for r in table["rows"] if r["cell"] == cell and r["checkpoint"] == kind)


def _percent(per_seed: dict[int, float]) -> dict[int, float]:
    return {s: 100 * v for s, v in per_seed.items()}


def sweep_points(table: dict[str, Any], spec: TableSpec, sweep: Sweep) -> dict[str, Any]:
    """Per checkpoint kind and column: the swept cells' accuracies (%) per seed at their option value, and
    the reference cell's per seed."""
    xs = {cell: option_value(spec, spec.cell(cell), sweep.option) for cell in sweep.cells}
    points: dict[str, Any] = {"option": sweep.option, "reference": sweep.reference, "by_checkpoint": {}}
    for kind in spec.checkpoints:
        columns = {}
        for column in sweep.columns:
            line = [{"cell": cell, "x": xs[cell], "seeds": _percent(_row(table, cell, kind)["per_seed"][column])}
                    for cell in sorted(sweep.cells, key=xs.get)]
            ref = _percent(_row(table, sweep.reference, kind)["per_seed"][column]) if sweep.reference else {}
            columns[column] = {"line": line, "reference": ref}
        points["by_checkpoint"][kind] = columns
    return points
