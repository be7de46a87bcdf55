"""Accuracy against one setting across a table's cells (a `[[sweeps]]` entry of the spec): the points that
the table JSON records and the plot draws."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .spec import Sweep, TableSpec, option_value

Rows = Sequence[Mapping[str, Any]]  # the table's rows (table.Row; not imported: table.py imports this module)


def _row(rows: Rows, cell: str, kind: str) -> Mapping[str, Any]:
    return next(r for r in rows if r["cell"] == cell and r["checkpoint"] == kind)


def _percent(per_seed: Mapping[int, float]) -> dict[int, float]:
    return {s: 100 * v for s, v in per_seed.items()}


def sweep_points(rows: Rows, spec: TableSpec, sweep: Sweep) -> dict[str, Any]:
    """Per checkpoint kind and column: the swept cells' accuracies (%) per seed at their option value, and
    the reference cell's per seed (from the table's `rows`)."""
    xs = {cell: option_value(spec, spec.cell(cell), sweep.option) for cell in sweep.cells}
    points: dict[str, Any] = {"option": sweep.option, "reference": sweep.reference, "by_checkpoint": {}}
    for kind in spec.checkpoints:
        columns = {}
        for column in sweep.columns:
            line = [{"cell": cell, "x": xs[cell], "seeds": _percent(_row(rows, cell, kind)["per_seed"][column])}
                    for cell in sorted(sweep.cells, key=lambda c: xs[c])]
            ref = _percent(_row(rows, sweep.reference, kind)["per_seed"][column]) if sweep.reference else {}
            columns[column] = {"line": line, "reference": ref}
        points["by_checkpoint"][kind] = columns
    return points
