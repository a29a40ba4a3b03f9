"""The report's figures drawn with matplotlib, for notebooks: ``Run.plot`` and ``Run.heatmap``.

What is drawn comes from :mod:`gradscope.report.specs`, as in the report; only the drawing
differs. A heatmap shows the report's pixels (the RGB array of :func:`figures.colorize`) with a
colour bar from the same colormap table and range. Figures are made without pyplot: no global
figure registry, no backend switched, nothing left open; :class:`PlotFigure` shows itself once
in Jupyter (``_repr_png_``, or the formatter matplotlib-inline registers for ``Figure``).

The only module of gradscope that imports matplotlib (the report does not: startup cost).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import figures
from .data import run_report_data
from .specs import (
    MAX_LINES,
    Bars,
    Heatmap,
    Lines,
    Plot,
    heatmap_spec,
    is_run_level,
    layer_lines_spec,
    run_lines_spec,
    select,
)

if TYPE_CHECKING:
    from ..load import Run

REMEDY_COLOR = "#9467bd"


class PlotFigure(Figure):
    """A matplotlib figure that displays itself in Jupyter (as a PNG) without pyplot."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def plot(
    run: Run, metric: str, layers: str | Sequence[str] | None = None, *, max_lines: int = MAX_LINES
) -> PlotFigure:
    """``metric`` per step bin, one line per layer (see :meth:`gradscope.Run.plot`).

    Raises:
        ValueError: An unknown metric, a name or pattern that matches no layer, ``layers``
            for a run-level metric, or ``max_lines`` < 1 (one-line messages).
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be at least 1, got {max_lines!r}")
    data = run_report_data(run, [metric])
    if is_run_level(data, metric):
        if layers is not None:
            raise ValueError(f"{metric!r} is a run-level metric: it has no layers to pick")
        panel = run_lines_spec(data, metric)
    else:
        names, _ = data.ordered(metric)
        rows = select(names, layers, data.findings, max_lines)
        panel = layer_lines_spec(data, metric, rows)
    assert panel is not None and panel.plot is not None  # the metric has records
    return draw(panel.plot)


def heatmap(run: Run, metric: str) -> PlotFigure:
    """``metric`` per layer and step bin (see :meth:`gradscope.Run.heatmap`).

    Raises:
        ValueError: An unknown or run-level metric (a one-line message).
    """
    data = run_report_data(run, [metric])
    plot = heatmap_spec(data, metric).plot
    assert plot is not None
    return draw(plot)


def draw(plot: Plot) -> PlotFigure:
    """A figure's spec drawn with matplotlib."""
    if isinstance(plot, Heatmap):
        return draw_heatmap(plot)
    if isinstance(plot, Lines):
        return draw_lines(plot)
    return draw_bars(plot)


def draw_heatmap(spec: Heatmap) -> PlotFigure:
    """The report's heatmap: its RGB pixels (nearest, stretched), layers on the y axis (every
    k-th name when many), steps on the x axis, a colour bar of the same table and range."""
    rows, cols = spec.values.shape
    lo, hi = spec.value_range()
    rgb = figures.colorize(spec.values, spec.bad, spec.cmap, lo, hi)
    height = min(12.0, max(3.0, 1.4 + 0.12 * rows))
    fig = PlotFigure(figsize=(9.0, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    end = int(spec.steps[-1]) + spec.width if cols else 1
    ax.imshow(rgb, aspect="auto", interpolation="nearest", extent=(0, end, rows - 0.5, -0.5))
    fits = max(1, int((height - 1.2) * 72 / 10))  # names of 8 points, 10 apart
    every = max(1, math.ceil(rows / fits))
    ticks = list(range(0, rows, every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([figures._clip(spec.rows[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("step" + (f" (bins of {spec.width})" if spec.width > 1 else ""))
    ax.set_title(spec.title, loc="left")  # the keys, if any, on the right
    lut = ListedColormap(figures._lut(spec.cmap) / 255.0)
    fig.colorbar(ScalarMappable(Normalize(lo, hi), lut), ax=ax, label=spec.label)
    keys = []
    if spec.bad is not None and spec.bad.any():
        keys.append(Patch(color=figures.BAD_RGB, label="NaN/Inf"))
    if (np.isnan(spec.values) & ~(spec.bad if spec.bad is not None else False)).any():
        keys.append(Patch(color=figures.NAN_RGB, label="not recorded"))
    if keys:
        ax.legend(
            handles=keys,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=len(keys),
            fontsize="small",
            frameon=False,
        )
    return fig


def draw_lines(spec: Lines) -> PlotFigure:
    """The report's line chart: the same points (NaN/Inf dropped, and on a log scale the
    values <= 0), remedy actions as dashed lines, NaN/Inf as magenta ticks on the x axis."""
    fig = PlotFigure(figsize=(8.0, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, (name, x, y) in enumerate(spec.series):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if spec.log_y else True)
        ax.plot(
            x[keep],
            y[keep],
            color=figures.PALETTE[i % len(figures.PALETTE)],
            linewidth=1.4,
            marker="o" if keep.sum() == 1 else None,
            label=name,
        )
    if spec.log_y:
        ax.set_yscale("log")
    ax.set_xlim(0, max(spec.x_max, 1))
    for j, (step, _) in enumerate(spec.markers):
        ax.axvline(
            step,
            color=REMEDY_COLOR,
            linestyle=(0, (4, 3)),
            linewidth=1,
            label="remedy action" if j == 0 else "_remedy",
        )
    if spec.bad_x:
        ax.vlines(
            spec.bad_x,
            0,
            0.04,
            transform=ax.get_xaxis_transform(),
            colors=[figures.BAD_RGB],
            linewidth=2,
            label="NaN/Inf",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(spec.y_label)
    ax.set_title(spec.title)
    ax.grid(True, color="#ddd", linewidth=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def draw_bars(spec: Bars) -> PlotFigure:
    """The report's bar chart: per layer the mean (dark) and the maximum (light) of the
    finite values on a log scale, layers with NaN/Inf values marked with how many."""
    n = len(spec.names)
    fig = PlotFigure(
        figsize=(8.0, min(12.0, max(2.5, 1.0 + 0.2 * n))), dpi=100, layout="constrained"
    )
    ax = fig.add_subplot()
    y = np.arange(n)

    def positive(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)

    peak, mean = positive(spec.peak), positive(spec.mean)
    ax.barh(y, peak, height=0.8, color="#aec7e8", label="max")
    ax.barh(y, mean, height=0.4, color="#1f77b4", label="mean")
    ax.set_xscale("log")
    ax.set_yticks(list(y))
    ax.set_yticklabels([figures._clip(n) for n in spec.names], fontsize=8)
    ax.invert_yaxis()
    if spec.nonfinite is not None:
        for i, bad in enumerate(spec.nonfinite):
            if bad:
                ax.annotate(
                    f"NaN/Inf ×{int(bad)}",
                    (1.0, i),
                    xycoords=("axes fraction", "data"),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                    color=figures.BAD_RGB,
                )
    ax.set_xlabel(f"{spec.label} (log)")
    ax.set_title(spec.title)
    ax.legend(fontsize="small")
    return fig
