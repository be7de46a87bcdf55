"""Plots a person reads at a glance: eps in the data's units with readable spacing, every marker and band
named in a legend, method names rather than folder names, the sweep plot's points from the table."""
import pytest

pytest.importorskip("matplotlib")

from iat.records import MetricLine  # noqa: E402
from iat.reporting import plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """The figures the plot functions draw, instead of PNG files."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    return drawn


def _legend(fig) -> list[str]:
    """The texts of the panels' legends and of the figure's own (below the panels)."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _records(values):
    return [MetricLine(epoch=i + 1, lr=0.1, train={"loss": 1.0 / (i + 1)}, val_natural=v, val_robust=v / 2,
                       val_fgsm=v / 1.5, best_epoch=len(values)) for i, v in enumerate(values)]


def test_the_eps_sweep_is_labelled_in_k_over_255_and_spreads_the_small_values(figures):
    points = [{"eps": e, "accuracy": a} for e, a in [(0, .8), (2 / 255, .7), (8 / 255, .4), (32 / 255, .05), (0.5, 0),
                                                      (1, 0)]]
    plots.plot_eps_sweep(points, "x.png", title="t", train_eps=8 / 255)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2/255", "8/255", "32/255", "0.5", "1"]
    assert ax.get_xscale() == "symlog"
    position = ax.transData.transform  # 0 .. 32/255 takes more than a third of the axis width, not 12%
    left, right = position((0, 0))[0], position((1, 0))[0]
    assert (position((32 / 255, 0))[0] - left) / (right - left) > 0.35
    assert "training eps 8/255" in _legend(figures[0])


def test_stars_and_bands_are_explained_in_the_legend(figures):
    plots.plot_training_curves({"pgd-at (seed0)": _records([.5, .6])}, "x.png")
    assert "best checkpoint (best val robust accuracy)" in _legend(figures[0])
    plots.plot_seed_curves({"iat": {0: _records([.5, .6]), 1: _records([.4, .7])}}, "y.png")
    assert _legend(figures[1]) == ["iat: mean of 2 seeds", "band: range over seeds"]


def test_the_option_sweep_draws_means_seeds_and_the_reference(figures):
    line = [{"cell": "a", "x": 0.0, "seeds": {0: 70.0, 1: 72.0}}, {"cell": "b", "x": 0.1, "seeds": {0: 75.0, 1: 71.0}}]
    points = {"option": "method_options.eps_inv", "reference": "pgd-at",
              "by_checkpoint": {"last": {"autoattack": {"line": line, "reference": {0: 69.0, 1: 70.0}}}}}
    plots.plot_option_sweep(points, "z.png")
    ax = figures[0].axes[0]
    assert _legend(figures[0]) == ["last: mean of 2 seeds", "last: one seed", "pgd-at last (band: seed range)"]
    mean_line = ax.get_lines()[0]
    assert list(mean_line.get_ydata()) == [71.0, 73.0] and ax.get_xlabel() == "eps_inv"
    assert ax.get_title() == "autoattack"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.1"]


def test_a_sweep_whose_points_have_different_seed_counts_says_so(figures):
    line = [{"cell": "a", "x": 0.0, "seeds": {0: 70.0, 1: 72.0, 2: 71.0}}, {"cell": "b", "x": 0.05, "seeds": {2: 75.0}}]
    points = {"option": "method_options.eps_inv", "reference": "pgd-at",
              "by_checkpoint": {"best": {"natural": {"line": line, "reference": {}}}}}
    plots.plot_option_sweep(points, "z.png")
    assert _legend(figures[0])[0] == "best: mean of 1-3 seeds"


def test_a_one_seed_sweep_is_labelled_as_one_seed_not_a_mean(figures):
    line = [{"cell": "a", "x": 0.0, "seeds": {0: 70.0}}, {"cell": "b", "x": 0.1, "seeds": {0: 75.0}}]
    points = {"option": "method_options.eps_inv", "reference": "pgd-at",
              "by_checkpoint": {"best": {"natural": {"line": line, "reference": {0: 69.0}}}}}
    plots.plot_option_sweep(points, "z.png")
    assert _legend(figures[0]) == ["best: 1 seed", "pgd-at best (band: seed range)"]
