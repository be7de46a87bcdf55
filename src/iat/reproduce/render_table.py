"""`iat reproduce`'s table written out: Markdown, CSV and JSON beside the cells, the curves and sweep PNGs,
and the Markdown pasted into a document between its BEGIN/END markers. The numbers come from table.py."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..records import atomic_write_bytes, atomic_write_text
from ..reporting.render import csv_text, fmt_eps, markdown_table
from .spec import TableSpec
from .table import Claim, MeanStd, Row, Table, build_table

BEGIN, END = "<!-- iat reproduce {}: begin (generated; do not edit) -->", "<!-- iat reproduce {}: end -->"


def _fmt(ms: MeanStd, n: int) -> str:
    mean, std = ms
    return "-" if mean is None else f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _partial(row: Row, column: str) -> str:
    """Marks a column measured on fewer seeds than the row (e.g. AutoAttack still running)."""
    k = len(row["per_seed"][column])
    return f" ({k} of {len(row['seeds'])} seeds)" if 0 < k < len(row["seeds"]) else ""


def _protocol_lines(table: Table) -> list[str]:
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


def _row_cells(r: Row, cols: Sequence[str]) -> list[str]:
    n = len(r["seeds"])
    co = "; ".join(f"s{s}: {','.join(map(str, e)) or '-'}" for s, e in sorted(r["co"].items()))
    epochs = f" (ep {','.join(map(str, r['epochs']))})" if r["checkpoint"] == "best" and r["epochs"] else ""
    return [r["cell"], r["checkpoint"] + epochs, str(n),
            *[_fmt(r["acc"][c], len(r["per_seed"][c])) + _partial(r, c) for c in cols], _fmt(r["epoch_seconds"], n), co]


def _claim_cells(c: Claim, cols: Sequence[str]) -> list[list[str]]:
    """One row per checkpoint of a claim; the verdict on the first."""
    rows = []
    for kind, diffs in c["by_checkpoint"].items():
        cells = [f"{d['mean']:+.1f} ({d['wins']}/{d['seeds']})" if d["mean"] is not None else "-"
                 for d in (diffs[col] for col in cols)]
        verdict = c["verdict"] if kind == next(iter(c["by_checkpoint"])) else ""
        rows.append([c["claim"], f"{c['ours']} vs {c['base']}", kind, *cells, verdict])
    return rows


def to_markdown(table: Table, images: Sequence[tuple[str, str]], command: str) -> str:
    """The table's Markdown block: rows per cell and checkpoint, the claims with their verdicts, the protocol,
    then `images` ((caption, path) pairs) as image links; `command` is the line that regenerates it."""
    cols = table["columns"]
    lines = [f"### {table['title']}", "", f"Regenerate: `{command}`", ""]
    if not table["complete"]:
        lines += [f"**Incomplete**: no finished run for {', '.join(table['missing'])}.", ""]
    lines += ["Accuracy (%) on the test examples, mean ± sample standard deviation over seeds; `best` = epoch with "
              "the best PGD-10 accuracy on the held-out validation split, `last` = final epoch.", ""]
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


def to_csv(table: Table) -> str:
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


def _draw(spec: TableSpec, table: Table, out: Path) -> list[tuple[str, str]]:
    """The table's PNGs in `out`: (caption, file name) of the validation curves and of each sweep."""
    from ..reporting.plots import plot_option_sweep, plot_seed_curves

    images = []
    if table["curves"]:
        plot_seed_curves(table["curves"], out / "curves.png", title=spec.title)
        images.append(("validation curves", "curves.png"))
    for sweep, points in zip(spec.sweeps, table["sweeps"], strict=True):  # one points entry per spec sweep
        plot_option_sweep(points, out / f"sweep-{sweep.name}.png", title=f"{spec.title}: accuracy against {sweep.name}")
        images.append((f"accuracy against {sweep.name}", f"sweep-{sweep.name}.png"))
    return images


def write_table(spec: TableSpec, out: Path, results_md: Optional[Path], command: str, plots: bool = True) -> Table:
    """Build the table from the cells under `out` and write table.md/.csv/.json (and the PNGs) there; with
    `results_md`, also paste it into that document, its images copied beside it as results/<table>-<image>."""
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
