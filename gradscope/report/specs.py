"""What each figure draws, built once from a :class:`ReportData` and drawn by two backends.

A spec holds a figure's content: its kind (:class:`Heatmap`, :class:`Lines`, :class:`Bars`),
the arrays to draw (per layer and step bin), the layer names, the bins' steps, the scale, the
colormap and its range, the labels, the remedy markers and the NaN/Inf marks. The report draws
specs as inline SVG (:mod:`gradscope.report.figures`, no matplotlib); ``Run.plot`` and
``Run.heatmap`` draw the same specs with matplotlib (:mod:`gradscope.report.mpl`). So a figure
in a notebook shows what the report shows, from one implementation.

How a metric is folded and scaled (the report's choices for the metrics it draws):

* ``grad_norm``, ``update_ratio``: the geometric mean of each bin, on a log scale.
* ``act_dead_fraction``, ``act_saturation``: the mean of each bin on 0..1, each sample held
  until the next (they are sampled every ``activation_every`` steps), NaN/Inf in the
  activation's output marking the bin.
* ``grad_norm_total``, ``grad_norm_total_clipped``: the mean of each bin, on a log scale.
* ``loss``: the mean of each bin, on a log scale when every finite value is > 0.
* any other metric: the mean of each bin, on a log scale when every finite value is > 0 and
  the bins' means span more than a decade, else linear. Its heatmap holds each sample until
  the next (most such metrics are sampled: ``weight_norm``, ``act_mean``...), as the report
  does for the activation fractions.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Union

import numpy as np

from ..records import RUN_LAYER
from . import figures
from .data import ReportData, run_series

MAX_LINES = 8  # layers drawn as lines in a per-layer chart
MAX_BARS = 60  # layers in the bar chart


@dataclass(frozen=True)
class Heatmap:
    """Rows (layers, forward order, top to bottom) x step bins, coloured by value in ``cmap``
    between ``vmin`` and ``vmax`` (None: the finite values' extremes); ``bad``: NaN/Inf seen in
    the cell."""

    kind: ClassVar[str] = "heatmap"
    values: np.ndarray
    bad: np.ndarray | None
    rows: list[str]
    steps: np.ndarray  # the first step of each bin
    width: int  # steps per bin
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None
    label: str = ""
    title: str = ""

    def value_range(self) -> tuple[float, float]:
        """The values that the colormap's ends stand for (what the colour bar shows)."""
        return figures.heat_range(self.values, self.vmin, self.vmax)


@dataclass(frozen=True)
class Lines:
    """Series of (name, steps, values); vertical ``markers`` (step, remedy action) and NaN/Inf
    ticks at ``bad_x``."""

    kind: ClassVar[str] = "lines"
    series: list[tuple[str, np.ndarray, np.ndarray]]
    log_y: bool
    x_max: float
    y_label: str = ""
    title: str = ""
    markers: list[tuple[float, str]] = field(default_factory=list)
    bad_x: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Bars:
    """Per layer: the mean and the maximum of the finite values (log scale), and how many
    NaN/Inf values."""

    kind: ClassVar[str] = "bars"
    names: list[str]
    mean: np.ndarray
    peak: np.ndarray
    title: str = ""
    label: str = ""
    nonfinite: np.ndarray | None = None


# a spec's fields are the arguments of what draws it: figures.heatmap, line_chart, bar_chart
Plot = Union[Heatmap, Lines, Bars]


@dataclass(frozen=True)
class Panel:
    """A figure of the report: its section id and heading, what it draws (None: nothing
    recorded, ``empty`` says so) and the note under it."""

    id: str
    title: str
    plot: Plot | None
    note: str = ""
    empty: str = "Nothing recorded."


@dataclass(frozen=True)
class _Style:
    label: str
    geometric: bool = False  # geometric mean per bin, log scale
    fraction: bool = False  # 0..1, held between samples
    log: bool | None = None  # None: decided from the values (see the module's docstring)
    log_if_positive: bool = False  # log whenever every finite value is > 0
    cmap: str = "viridis"


STYLES = {
    "grad_norm": _Style("‖g‖", geometric=True),
    "update_ratio": _Style("‖Δw‖/‖w‖", geometric=True),
    "act_dead_fraction": _Style("dead", fraction=True, cmap="Reds"),
    "act_saturation": _Style("saturated", fraction=True, cmap="Oranges"),
    "grad_norm_total": _Style("‖g‖ total", log=True),
    "grad_norm_total_clipped": _Style("‖g‖ total", log=True),
    "loss": _Style("loss", log_if_positive=True),
}


def _style(metric: str) -> _Style:
    return STYLES.get(metric, _Style(metric))


@dataclass(frozen=True)
class Grid:
    """A per-layer metric folded into step bins, as drawn: rows in forward order."""

    names: list[str]
    values: np.ndarray  # per row and bin, in the metric's units (NaN: nothing recorded)
    logs: np.ndarray | None  # log10 of ``values``, when drawn on a log scale
    bad: np.ndarray  # per row and bin: NaN/Inf seen


def layer_grid(data: ReportData, metric: str, *, held: bool = False) -> Grid:
    """``metric`` per layer (forward order) and bin, folded and scaled as the module's
    docstring says; ``held``: each sample carried forward over the bins without one (always,
    for the activation fractions)."""
    names, idx = data.ordered(metric)
    acc = data.acc[metric]
    style = _style(metric)
    bad = acc.nonfinite()[idx]
    logs: np.ndarray | None = None
    if style.geometric:
        logs = acc.log_mean()[idx]
        if held:
            logs, bad = _held(logs, bad)
        values = 10**logs
    elif style.fraction:
        values, bad = _held(acc.mean()[idx], bad | data.site_nonfinite(names))
    else:
        values = acc.mean()[idx]
        if held:
            values, bad = _held(values, bad)
        if _log_scale(style, values, positive=bool(np.all(acc.logcount == acc.count))):
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.log10(values)
    return Grid(names, values, logs, bad)


def _log_scale(style: _Style, values: np.ndarray, positive: bool) -> bool:
    """The scale of a metric without a geometric mean: ``style.log`` where set; with
    ``style.log_if_positive``, log when every finite value of ``values`` (the bins' means) is
    > 0; else log when every finite value recorded is > 0 (``positive``) and the bins' means
    span more than a decade."""
    if style.log is not None:
        return style.log
    finite = values[np.isfinite(values)]
    if style.log_if_positive:
        return bool(np.all(finite > 0))
    if not positive or not finite.size or finite.min() <= 0:
        return False
    return bool(finite.max() > 10 * finite.min())


def _last(data: ReportData) -> int:
    """The end of the step axis: one past the last step recorded."""
    return data.last_step + 1 if data.last_step >= 0 else 1


def remedy_markers(events: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """The remedy actions as (step, what) markers (clipping, at every step, is not one)."""
    marks = []
    for e in events:
        step = e.get("step")
        if (
            e.get("event") == "remedy"
            and isinstance(step, int)
            and e.get("action") not in ("clipped",)
        ):
            marks.append(
                (float(step), f"{e.get('remedy')}: {e.get('action')} {e.get('layer', '')}".strip())
            )
    return marks


def picked(names: list[str], findings: list[dict[str, Any]], limit: int = MAX_LINES) -> list[int]:
    """Which rows to draw as lines: layers with findings, then evenly spaced ones in forward
    order (first and last included)."""
    flagged = {str(x) for f in findings for x in [f.get("layer"), *(f.get("layers") or [])]}
    chosen = [i for i, n in enumerate(names) if n in flagged or n.rsplit(".", 1)[0] in flagged]
    chosen = chosen[: limit // 2]
    rest = limit - len(chosen)
    if len(names) <= limit:
        return list(range(len(names)))
    spaced = np.unique(np.linspace(0, len(names) - 1, max(rest, 2)).round().astype(int))
    return sorted(set(chosen) | {int(i) for i in spaced})[:limit]


def select(
    names: list[str],
    layers: str | Sequence[str] | None,
    findings: list[dict[str, Any]],
    limit: int = MAX_LINES,
    what: str = "layer",
) -> list[int]:
    """The rows of ``names`` to draw: as :func:`picked` when ``layers`` is None; else those
    that ``layers`` names exactly or matches as fnmatch patterns (``"encoder.*"``), in forward
    order, thinned as :func:`picked` does when more than ``limit`` match.

    Raises:
        ValueError: A name or pattern matches none of ``names`` (a one-line message naming it
            and a few of the names there are).
    """
    if layers is None:
        return picked(names, findings, limit)
    wanted = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[int] = set()
    for pattern in wanted:
        hits = [i for i, n in enumerate(names) if n == pattern]
        if not hits and isinstance(pattern, str):
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"no {what} matches {pattern!r}; {_some(names, what)}")
        chosen.update(hits)
    rows = sorted(chosen)
    if len(rows) > limit:
        sub = picked([names[i] for i in rows], findings, limit)
        rows = [rows[j] for j in sub]
    return rows


def _some(names: Sequence[str], what: str, n: int = 6) -> str:
    """``the layers are 'a', 'b'... (N layers in all)``, for one-line errors."""
    shown = ", ".join(repr(x) for x in names[:n])
    more = f"... ({len(names)} {what}s in all)" if len(names) > n else ""
    return f"the {what}s are {shown}{more}" if names else f"there is no {what}"


def _held(values: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's last sample carried forward over the bins without one (sampled metrics
    would otherwise be thin stripes on grey), NaN/Inf marks included: a bin after a NaN
    sample is not shown as the finite sample before it."""
    out, mark = values.copy(), bad.copy()
    for j in range(1, out.shape[1]):
        gap = np.isnan(out[:, j]) & ~mark[:, j]
        out[gap, j] = out[gap, j - 1]
        mark[gap, j] = mark[gap, j - 1]
    return out, mark


# -- the figures ---------------------------------------------------------------------------------
_FRACTION_TITLES = {
    "act_dead_fraction": ("dead-units", "Dead units (fraction per activation)"),
    "act_saturation": ("saturation", "Saturated units (fraction per activation)"),
}


def is_run_level(data: ReportData, metric: str) -> bool:
    """``metric`` is recorded for the run as a whole (``loss``...), not per layer."""
    acc = data.acc.get(metric)
    return acc is not None and acc.names == [RUN_LAYER]


def heatmap_spec(data: ReportData, metric: str) -> Panel:
    """The heatmap of a per-layer ``metric``: the report's gradient flow for ``grad_norm``,
    its dead and saturated units for the activation fractions.

    Raises:
        ValueError: ``metric`` is run-level (one value per step: nothing to lay out by layer).
    """
    if is_run_level(data, metric):
        raise ValueError(
            f"{metric!r} is a run-level metric (one value per step, no layers): plot it as a "
            "line, there is no heatmap of it"
        )
    style = _style(metric)
    grid = layer_grid(data, metric, held=metric != "grad_norm")
    if grid.logs is not None:
        values, vmin, vmax, label = grid.logs, None, None, f"log10 {style.label}"
    elif style.fraction:
        values, vmin, vmax, label = grid.values, 0.0, 1.0, style.label
    else:
        values, vmin, vmax, label = grid.values, None, None, style.label
    if metric == "grad_norm":
        fid, title = "gradient-flow", "Gradient flow"
        chart = "gradient norm per parameter and step"
        note = (
            "log10 of each parameter's gradient norm (geometric mean over each bin), "
            "parameters in forward order from top (input) to bottom (output); magenta: a "
            "NaN/Inf gradient in the bin; grey: not recorded."
        )
    elif metric in _FRACTION_TITLES:
        fid, title = _FRACTION_TITLES[metric]
        chart = title
        note = (
            "sampled every activation_every steps, each sample held until the next; "
            "activations in forward order; magenta: NaN/Inf in the activation (its fraction "
            "means nothing there); grey: not sampled yet"
        )
    else:
        fid, title, chart = metric, metric, f"{metric} per layer and step"
        note = "each sample held until the next; magenta: NaN/Inf; grey: not recorded"
    plot = Heatmap(
        values,
        grid.bad,
        grid.names,
        data.bin_steps(),
        data.width,
        cmap=style.cmap,
        vmin=vmin,
        vmax=vmax,
        label=label,
        title=chart,
    )
    return Panel(fid, title, plot, note)


def layer_lines_spec(
    data: ReportData, metric: str, rows: list[int] | None = None, *, limit: int = MAX_LINES
) -> Panel:
    """Lines of a per-layer ``metric``, one per row of ``rows`` (indices into the metric's
    layers in forward order; None: :func:`picked`). NaN/Inf ticks mark the bins where any
    layer of the metric had one, as in the report."""
    grid = layer_grid(data, metric)
    steps = data.bin_steps()
    pick = picked(grid.names, data.findings, limit) if rows is None else rows
    log_y = grid.logs is not None
    label = _style(metric).label
    if metric == "grad_norm":
        fid, title, chart = "grad-norms", "Gradient norm per layer", "gradient norms"
        note = (
            f"{len(pick)} of {len(grid.names)} parameters (those with findings, then evenly "
            "spaced in forward order)"
            if len(pick) < len(grid.names)
            else ""
        )
    elif metric == "update_ratio":
        fid, title, chart = "update-ratios", "Update ratio ‖Δw‖/‖w‖", "update ratios"
        note = (
            "around 1e-3 is the usual healthy band (CS231n); far above, the learning rate is "
            "too high for the layer; far below, the layer barely learns."
        )
    else:
        fid, title, chart = metric, metric, metric
        note = f"{len(pick)} of {len(grid.names)} layers" if len(pick) < len(grid.names) else ""
    plot = Lines(
        [(grid.names[i], steps, grid.values[i]) for i in pick],
        log_y=log_y,
        x_max=_last(data),
        y_label=label,
        title=chart,
        markers=remedy_markers(data.events),
        bad_x=[float(s) for s in steps[grid.bad.any(axis=0)]],
    )
    return Panel(fid, title, plot, note)


def run_lines_spec(data: ReportData, metric: str) -> Panel | None:
    """A run-level ``metric`` (``loss``, ``grad_norm_total``...) as one line, the mean of each
    bin; None when it was not recorded."""
    found = run_series(data, metric)
    if found is None:
        return None
    x, y, bad, _ = found
    style = _style(metric)
    acc = data.acc[metric]
    positive = bool(np.all(acc.logcount == acc.count))
    if metric == "loss":
        fid, title = "loss", "Loss"
        note = "mean per bin; dashed lines: remedy actions; magenta ticks: NaN/Inf loss"
    elif metric == "grad_norm_total":
        fid, title, note = "grad-total", "Total gradient norm", ""
    else:
        fid, title, note = metric, metric, "mean per bin"
    plot = Lines(
        [("total" if metric == "grad_norm_total" else metric, x, y)],
        log_y=_log_scale(style, y, positive),
        x_max=_last(data),
        y_label=style.label,
        title="total gradient norm" if metric == "grad_norm_total" else metric,
        markers=remedy_markers(data.events),
        bad_x=[float(s) for s in x[bad]],
    )
    return Panel(fid, title, plot, note)


def grad_bars_spec(data: ReportData) -> Panel:
    """The mean and largest gradient norm per parameter over the run (at most
    :data:`MAX_BARS`: those with NaN/Inf, then the largest)."""
    names, idx = data.ordered("grad_norm")
    acc = data.acc["grad_norm"]
    mean, peak = acc.whole_run()
    nbad = acc.nonfinite_count()[idx]
    order = list(range(len(names)))
    note = ""
    if len(names) > MAX_BARS:
        # layers with NaN/Inf first, then the largest gradients
        key = np.where(nbad > 0, np.inf, np.nan_to_num(peak[idx], nan=-1.0))
        order = sorted(np.argsort(-key, kind="stable")[:MAX_BARS].tolist())
        note = f"the {MAX_BARS} parameters with NaN/Inf or the largest gradients, of {len(names)}"
    plot = Bars(
        [names[i] for i in order],
        mean[idx][order],
        peak[idx][order],
        title="gradient norm per layer",
        label="‖g‖",
        nonfinite=nbad[order],
    )
    return Panel(
        "grad-bars",
        "Mean and largest gradient norm per layer",
        plot,
        (note + "; " if note else "") + "over the finite values; magenta: NaN/Inf gradients "
        "(how many)"
        if nbad.any()
        else note,
    )


def report_panels(data: ReportData) -> list[Panel]:
    """The report's figures, in order."""
    panels: list[Panel] = []
    if data.ordered("grad_norm")[0]:
        panels.append(heatmap_spec(data, "grad_norm"))
        panels.append(layer_lines_spec(data, "grad_norm"))
        panels.append(grad_bars_spec(data))
    else:
        panels.append(
            Panel("gradient-flow", "Gradient flow", None, empty="No gradient norms recorded.")
        )
    total = run_lines_spec(data, "grad_norm_total")
    if total is not None:
        clipped = run_series(data, "grad_norm_total_clipped")
        if clipped is not None and isinstance(total.plot, Lines):
            series = [*total.plot.series, ("after clipping", clipped[0], clipped[1])]
            total = replace(total, plot=replace(total.plot, series=series))
        panels.append(total)
    if data.ordered("update_ratio")[0]:
        panels.append(layer_lines_spec(data, "update_ratio"))
    for metric in _FRACTION_TITLES:
        if data.ordered(metric)[0]:
            panels.append(heatmap_spec(data, metric))
    loss = run_lines_spec(data, "loss")
    panels.append(
        loss if loss is not None else Panel("loss", "Loss", None, empty="No loss recorded.")
    )
    return panels
