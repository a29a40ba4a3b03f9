"""``Run.plot`` and ``Run.heatmap``: the report's figures drawn with matplotlib, from the same
specs (gradscope/report/specs.py), checked against the report's own pixels and against the
records folded independently with pandas."""

from __future__ import annotations

import fnmatch
import sys

import numpy as np
import pytest
from test_imports import _imported_after
from test_report import _mlp, _png, _sections, _train
from torch import nn

import gradscope
from gradscope.report import figures
from gradscope.report.data import read_report_data, run_report_data

STEPS = 25


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """35 linear layers, 34 ReLU sites (a ``dead_units`` finding deep in it), activations
    sampled every 2 steps, update ratios and weight norms every 4."""
    import torch

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 8)]
    for _ in range(34):
        layers += [nn.ReLU(), nn.Linear(8, 8)]
    run_dir = _train(
        nn.Sequential(*layers), STEPS, tmp_path_factory.mktemp("deep"), activation_every=2
    )
    return gradscope.load_run(run_dir)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A NaN input at step 8, skipped by the guard: a NaN loss and a remedy action there."""
    run_dir = _train(_mlp(), 20, tmp_path_factory.mktemp("guard"), nan_at=8, guard=True)
    return gradscope.load_run(run_dir)


def _lines(fig):
    """The axes of a line chart and its series."""
    (ax,) = [a for a in fig.axes if a.get_lines()]
    return ax, [ln for ln in ax.get_lines() if ln.get_linestyle() != "--"]  # not remedies


def test_the_heatmap_shows_the_reports_pixels(deep):
    fig = deep.heatmap("grad_norm")
    ax = fig.axes[0]
    pixels = ax.images[0].get_array()
    # what the report folds from the files on disk, coloured as the report colours it
    data = read_report_data(deep.path)
    names, idx = data.ordered("grad_norm")
    acc = data.acc["grad_norm"]
    logmean = acc.log_mean()[idx]
    lo, hi = figures.heat_range(logmean)
    expected = figures.colorize(logmean, acc.nonfinite()[idx], "viridis", lo, hi)
    assert pixels.shape == (len(names), STEPS, 3) and np.array_equal(pixels, expected)
    # and the PNG in report.html: the same pixels, 8-bit
    text = (deep.path / "report.html").read_text(encoding="utf-8")
    uri = next(a["href"] for t, a in _sections(text)["gradient-flow"] if t == "image")
    assert np.allclose(_png(uri)[..., :3], pixels, atol=1 / 255)
    assert ax.images[0].get_interpolation() == "nearest" and ax.get_aspect() == "auto"
    # thinned layer names, in forward order, from the top; a colour bar over the same range
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "0.weight" and 1 < len(labels) < len(names)
    assert labels == [names[round(t)] for t in ax.get_yticks()]
    (bar,) = [a for a in fig.axes if a is not ax]
    assert bar.get_ylim() == pytest.approx((lo, hi))


def test_a_sampled_fraction_heatmap_is_the_reports(deep):
    pixels = deep.heatmap("act_dead_fraction").axes[0].images[0].get_array()
    text = (deep.path / "report.html").read_text(encoding="utf-8")
    uri = next(a["href"] for t, a in _sections(text)["dead-units"] if t == "image")
    assert pixels.shape[:2] == (34, STEPS)
    assert np.allclose(_png(uri)[..., :3], pixels, atol=1 / 255)


def test_a_line_is_the_reports_series(deep):
    fig = deep.plot("grad_norm", layers=["0.weight"])
    ax, lines = _lines(fig)
    assert [ln.get_label() for ln in lines] == ["0.weight"] and ax.get_yscale() == "log"
    g = deep.metrics.query("metric == 'grad_norm' and layer == '0.weight'").sort_values("step")
    assert list(lines[0].get_xdata()) == g["step"].tolist()
    assert lines[0].get_ydata() == pytest.approx(g["value"].to_numpy(), rel=1e-12)
    # in bins of 4 (25 steps in 7 bins): the geometric mean of each bin, folded from the
    # loaded run the way the report folds the files
    data = run_report_data(deep, ["grad_norm"], max_cols=7)
    assert (data.width, data.cols) == (4, 7)
    names, idx = data.ordered("grad_norm")
    folded = 10 ** data.acc["grad_norm"].log_mean()[idx][names.index("0.weight")]
    geo = g.groupby(g["step"] // 4)["value"].apply(lambda v: np.exp(np.log(v).mean()))
    assert folded == pytest.approx(geo.to_numpy(), rel=1e-9)


def test_a_held_fraction_line(deep):
    site = deep.wide("act_dead_fraction").columns[0]
    _, lines = _lines(deep.plot("act_dead_fraction", layers=site))
    held = deep.wide("act_dead_fraction")[site].reindex(range(STEPS)).ffill()
    assert [ln.get_label() for ln in lines] == [site]
    assert lines[0].get_ydata() == pytest.approx(held.to_numpy(), rel=1e-12)


def test_patterns_pick_layers_in_forward_order(deep):
    names = [e["name"] for e in deep.meta["layers"] if e["kind"] == "param"]
    _, lines = _lines(deep.plot("weight_norm", layers="2*.weight"))
    assert [ln.get_label() for ln in lines] == [n for n in names if fnmatch.fnmatch(n, "2*.weight")]
    _, lines = _lines(deep.plot("grad_norm", layers=["*.bias", "0.weight"], max_lines=5))
    labels = [ln.get_label() for ln in lines]
    assert len(labels) == 5 and labels[0] == "0.weight" and labels[-1] == "68.bias"


def test_the_default_pick_holds_the_findings_layers(deep):
    flagged = {f["layer"] for f in deep.findings if f["kind"] == "dead_units"}
    assert flagged
    _, lines = _lines(deep.plot("act_dead_fraction"))
    labels = [ln.get_label() for ln in lines]
    assert len(labels) == 8 and flagged <= set(labels)
    assert labels == sorted(labels, key=deep.layer_order.index)


@pytest.mark.parametrize(
    "call, bad, accepted",
    [
        (lambda r: r.plot("grad_nrom"), "'grad_nrom'", "grad_norm"),
        (lambda r: r.heatmap("nope"), "'nope'", "grad_norm"),
        (lambda r: r.plot("grad_norm", layers=["0.weight", "enc*"]), "'enc*'", "0.weight"),
        (lambda r: r.heatmap("loss"), "'loss'", "run-level"),
        (lambda r: r.plot("loss", layers="x"), "'loss'", "run-level"),
    ],
)
def test_errors_are_one_line_and_name_the_bad_value(deep, call, bad, accepted):
    with pytest.raises(ValueError) as info:
        call(deep)
    text = str(info.value)
    assert "\n" not in text and bad in text and accepted in text


def test_a_run_level_metric_is_one_series(guarded):
    ax, lines = _lines(guarded.plot("loss"))
    loss = guarded.metrics.query("metric == 'loss'").sort_values("step")
    finite = loss[np.isfinite(loss["value"])]
    assert [ln.get_label() for ln in lines] == ["loss"] and ax.get_yscale() == "log"
    assert list(lines[0].get_xdata()) == finite["step"].tolist()
    assert lines[0].get_ydata() == pytest.approx(finite["value"].to_numpy(), rel=1e-12)
    # the NaN loss at step 8 is a magenta tick, the guard's skip a dashed line
    (ticks,) = [c for c in ax.collections if c.get_label() == "NaN/Inf"]
    assert [seg[0][0] for seg in ticks.get_segments()] == [8.0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in dashed] == [8.0]
    _, lines = _lines(guarded.plot("lr"))
    assert [ln.get_label() for ln in lines] == ["lr"]


def test_other_metrics_scale_by_their_values(deep):
    for metric in ("weight_norm", "grad_max_abs", "act_mean", "output_grad_norm"):
        values = deep.metrics.query("metric == @metric")["value"]
        finite = values[np.isfinite(values)]
        fig = deep.plot(metric)
        ax, lines = _lines(fig)
        assert 0 < len(lines) <= 8
        means = deep.wide(metric).to_numpy()
        means = means[np.isfinite(means)]
        log = bool((finite > 0).all() and means.max() > 10 * means.min())
        assert ax.get_yscale() == ("log" if log else "linear"), metric
        rows = deep.metrics.query("metric == @metric")["layer"].nunique()
        assert deep.heatmap(metric).axes[0].images[0].get_array().shape[0] == rows


def test_figures_are_made_without_pyplot_and_show_as_png(deep):
    from matplotlib.figure import Figure

    fig = deep.heatmap("grad_norm")
    assert isinstance(fig, Figure)
    assert fig._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
    formatters = pytest.importorskip("IPython.core.formatters")
    shown, _ = formatters.DisplayFormatter().format(deep.plot("loss"))
    assert shown["image/png"].startswith(b"\x89PNG")


def test_loading_and_reporting_do_not_import_matplotlib():
    code = "import gradscope.load, gradscope.report.html, gradscope.report.specs"
    assert "matplotlib" not in _imported_after(code)


def test_every_report_figure_draws_with_matplotlib(guarded):
    """Every figure of the report (heatmaps, lines, the bar chart with its NaN/Inf counts)
    draws with the matplotlib backend from the very spec the report draws as SVG."""
    from gradscope.report.mpl import draw
    from gradscope.report.specs import Bars, report_panels

    data = read_report_data(guarded.path)
    panels = [p for p in report_panels(data) if p.plot is not None]
    assert {type(p.plot).__name__ for p in panels} == {"Heatmap", "Lines", "Bars"}
    for panel in panels:
        fig = draw(panel.plot)
        assert fig._repr_png_().startswith(b"\x89PNG")
        if isinstance(panel.plot, Bars):
            (ax,) = fig.axes
            assert [t.get_text() for t in ax.get_yticklabels()] == [
                figures._clip(n) for n in panel.plot.names
            ]
            marks = [t.get_text() for t in ax.texts]
            assert marks and marks == [f"NaN/Inf ×{int(n)}" for n in panel.plot.nonfinite if n]
