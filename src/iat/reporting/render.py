"""The one table renderer of `iat`'s reports: Markdown tables, CSV text and fixed-width terminal tables,
and `fmt_eps`, the one spelling of an eps in every report, plot and flag.

Pure functions of a header and rows; the callers format their numbers into cells first (a cell is
written with `format(cell, "")`, so strings pass through and None reads "None"). Imports nothing of
`iat`, so every other reporting module can import it."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Union

Rows = Sequence[Sequence[object]]


def fmt_eps(value: float) -> str:
    """8/255 for multiples of 1/255 below 1, else a short decimal."""
    k = value * 255
    if 0 < value < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:.4g}"


def markdown_row(cells: Sequence[object]) -> str:
    """`| a | b |`."""
    return "| " + " | ".join(f"{c}" for c in cells) + " |"


def markdown_rule(align: str) -> str:
    """The separator line: one character per column, "l" (`---`) or "r" (`---:`)."""
    if set(align) - {"l", "r"}:
        raise ValueError(f"align takes one 'l' or 'r' per column, got {align!r}")
    return "|" + "".join("---:|" if a == "r" else "---|" for a in align)


def markdown_table(header: Sequence[str], rows: Rows, align: str | None = None) -> list[str]:
    """Header, separator and one line per row (every column left-aligned unless `align` says otherwise)."""
    align = "l" * len(header) if align is None else align
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns, the header {len(header)}")
    return [markdown_row(header), markdown_rule(align), *(markdown_row(r) for r in rows)]


def csv_text(header: Sequence[str], rows: Rows, lineterminator: str = "\n") -> str:
    """The header and rows as CSV (the csv module's quoting), each line ended by `lineterminator`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def text_table(header: Sequence[str], rows: Rows, widths: Sequence[int], align: str,
               sep: Union[str, Sequence[str]] = "  ", rule_extra: int = 0) -> str:
    """Fixed-width lines: each cell padded to its column's width ("l" or "r" in `align`; a longer cell
    is not cut), columns joined by `sep` (one string, or one per gap); under the header a rule of dashes
    `rule_extra` longer than the header line."""
    seps = [sep] * (len(widths) - 1) if isinstance(sep, str) else list(sep)
    if not len(header) == len(widths) == len(align) == len(seps) + 1:
        raise ValueError("header, widths, align and sep do not agree on the number of columns")

    def line(cells: Sequence[object]) -> str:
        padded = [format(format(c), (">" if a == "r" else "<") + str(w))
                  for c, w, a in zip(cells, widths, align, strict=True)]
        return padded[0] + "".join(s + p for s, p in zip(seps, padded[1:], strict=True))

    head = line(header)
    return "\n".join([head, "-" * (len(head) + rule_extra), *(line(r) for r in rows)])
