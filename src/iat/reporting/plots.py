"""PNG plots with matplotlib's Agg canvas (no pyplot, no display, no global backend switch).

matplotlib is an optional extra: pip install "iat[plots]".
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from ..extras import require_matplotlib
from ..records import MetricLine, atomic_write_bytes
from .render import fmt_eps


def _figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, list[Any]]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: Union[str, Path]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_eps_sweep(points: Sequence[Mapping[str, Any]], path: Union[str, Path], *, title: str,
                   train_eps: float | None = None) -> Path:
    """Accuracy (%) against eps, one point per sweep value, ticks in the data's units (8/255 or 0.1); the
    axis is linear up to the smallest positive eps and logarithmic above it, so that the values around the
    training eps are as far apart as the full-range ones; a dotted line at the training eps."""
    fig, (ax,) = _figure(1, width=5.5, height=3.8)
    eps = [p["eps"] for p in points]
    ax.plot(eps, [100 * p["accuracy"] for p in points], "o-", color="C0", label="accuracy under the sweep attack")
    positive = sorted(e for e in eps if e > 0)
    if positive:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
    ax.set_xticks(eps, [fmt_eps(e) if e else "0" for e in eps], rotation=45, fontsize=8)
    ax.minorticks_off()
    if train_eps is not None:
        ax.axvline(train_eps, color="grey", linestyle=":", label=f"training eps {fmt_eps(train_eps)}")
    ax.legend(fontsize=8)
    ax.set_xlabel("eps (linear below the first value, logarithmic above)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curves(runs: Mapping[str, Sequence[MetricLine]], path: Union[str, Path], *,
                         robust_label: str = "val robust") -> Path:
    """Per run (label -> metrics.jsonl records): val natural accuracy, val robust accuracy, train loss per
    epoch; the best checkpoint's epoch is marked with a star."""
    fig, axes = _figure(3)
    panels = [("val natural accuracy (%)", lambda r: 100 * r.val_natural),
              (f"{robust_label} accuracy (%)", lambda r: 100 * r.val_robust),
              ("train loss", lambda r: r.train["loss"])]
    for i, (label, records) in enumerate(runs.items()):
        best = records[-1].best_epoch if records else None
        for ax, (_, value) in zip(axes, panels, strict=True):
            points = [(r.epoch, _value(value, r)) for r in records]
            points = [(e, v) for e, v in points if v is not None]
            xs, ys = [e for e, _ in points], [v for _, v in points]
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", color=f"C{i}", label=label, markersize=3)
            if best in xs:
                ax.plot([best], [ys[xs.index(best)]], "*", color=f"C{i}", markersize=12)
    if any(records for records in runs.values()):
        axes[0].plot([], [], "*", color="grey", markersize=10, label="best checkpoint (best val robust accuracy)")
    _epoch_axes(axes, [title for title, _ in panels], legend_size=8)
    return _save(fig, path)


def _epoch_axes(axes: Sequence[Any], titles: Sequence[str], legend_size: int, fig: Any = None) -> None:
    """Integer epoch ticks, titles, a light grid and the legend: on the first panel, or, given the figure
    and more than four entries (which would cover the first panel's curves), in columns below the panels."""
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, titles, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if fig is not None and len(labels) > 4:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=legend_size)
    else:
        axes[0].legend(fontsize=legend_size)


def _value(get: Any, record: MetricLine) -> float | None:
    try:
        return float(get(record))
    except (KeyError, TypeError, ValueError):
        return None


def plot_seed_curves(cells: Mapping[str, Mapping[int, Sequence[MetricLine]]], path: Union[str, Path], *,
                     title: str = "") -> Path:
    """Per cell (name -> seed -> metrics.jsonl records): validation natural, PGD and FGSM accuracy per epoch,
    the mean over seeds as a line and the range over seeds as a band."""
    fig, axes = _figure(3, height=3.8 if len(cells) > 3 else 3.4)  # room for a legend below the panels
    panels = [("val natural accuracy (%)", "val_natural"), ("val PGD-10 accuracy (%)", "val_robust"),
              ("val FGSM accuracy (%)", "val_fgsm")]
    for i, (name, seeds) in enumerate(cells.items()):
        for ax, (_, key) in zip(axes, panels, strict=True):
            by_epoch: dict[int, list[float]] = {}
            for records in seeds.values():
                for r in records:
                    if getattr(r, key) is not None:
                        by_epoch.setdefault(r.epoch, []).append(100 * float(getattr(r, key)))
            xs = sorted(by_epoch)
            if not xs:
                continue
            mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in xs]
            ax.plot(xs, mean, "o-" if len(xs) < 30 else "-", color=f"C{i}",
                    label=f"{name}: " + (f"mean of {len(seeds)} seeds" if len(seeds) > 1 else "one seed"), markersize=3)
            if len(seeds) > 1:
                ax.fill_between(xs, [min(by_epoch[e]) for e in xs], [max(by_epoch[e]) for e in xs],
                                color=f"C{i}", alpha=0.15, linewidth=0)
    if any(len(seeds) > 1 for seeds in cells.values()):
        axes[0].fill_between([], [], [], color="grey", alpha=0.15, linewidth=0, label="band: range over seeds")
    _epoch_axes(axes, [label for label, _ in panels], legend_size=7, fig=fig)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_option_sweep(points: Mapping[str, Any], path: Union[str, Path], *, title: str = "") -> Path:
    """Test accuracy (%) against one setting (a table's `[[sweeps]]` entry), one panel per column: per
    checkpoint kind a line through the means over seeds and a dot per seed; the reference cell as a dashed
    line at its mean with its range over seeds as a band."""
    kinds = list(points["by_checkpoint"])
    columns = list(points["by_checkpoint"][kinds[0]]) if kinds else []
    fig, axes = _figure(max(1, len(columns)), width=4.6, height=4.2)
    option = points["option"].rsplit(".", 1)[-1]
    for ax, column in zip(axes, columns, strict=False):  # no columns: one empty panel
        ticks = set()
        for i, kind in enumerate(kinds):
            data = points["by_checkpoint"][kind][column]
            line = [p for p in data["line"] if p["seeds"]]
            ticks |= {p["x"] for p in line}
            if line:
                counts = sorted({len(p["seeds"]) for p in line})
                n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"  # seeds behind a point
                several = counts[-1] > 1  # with one seed per point the line is the seeds: no separate dots label
                means = [sum(p["seeds"].values()) / len(p["seeds"]) for p in line]
                ax.plot([p["x"] for p in line], means, "o-" if i == 0 else "s--", color=f"C{i}",
                        label=f"{kind}: mean of {n} seeds" if several else f"{kind}: 1 seed",
                        markerfacecolor="none" if i else None)
                # the legend is the first panel's: name a point with fewer seeds
                for p, mean in zip(line, means, strict=True):
                    if i == 0 and len(p["seeds"]) < counts[-1]:
                        ax.annotate(f"{len(p['seeds'])} seed{'s' * (len(p['seeds']) > 1)}", (p["x"], mean),
                                    textcoords="offset points", xytext=(6, 6), fontsize=8)
                dots = [(p["x"], v) for p in line for v in p["seeds"].values()]
                ax.plot([x for x, _ in dots], [v for _, v in dots], ".", color=f"C{i}", alpha=0.45, markersize=6,
                        label=f"{kind}: one seed" if several else "_nolegend_")
            ref = list(data["reference"].values())
            if ref:
                ax.axhline(sum(ref) / len(ref), color=f"C{i}", linestyle=":", linewidth=1.2,
                           label=f"{points['reference']} {kind} (band: seed range)")
                ax.axhspan(min(ref), max(ref), color=f"C{i}", alpha=0.1, linewidth=0)
        ax.set_xticks(sorted(ticks), [fmt_eps(t) if t else "0" for t in sorted(ticks)])
        ax.set_xlabel(option)
        ax.set_ylabel(f"{column} accuracy (%)")
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3)
    if columns:  # one legend below the panels (they share it; inside one it covered the reference line)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
