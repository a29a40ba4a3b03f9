"""The HTML report: one self-contained file (inline CSS, inline SVG and PNG figures, no script,
nothing fetched), rendered with Jinja2 with autoescaping on, so text from the run (a layer named
``<img src=x onerror=alert(1)>`` by a ModuleDict key) is shown as text."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup

from .. import __version__, rundir
from ..load import finding_steps
from . import figures
from .data import ReportData, read_report_data, run_series

if TYPE_CHECKING:
    import jinja2

    from ..records import LongTable

MAX_LINES = 8  # layers drawn as lines in a per-layer chart
MAX_BARS = 60  # layers in the bar chart
REPORT = "report.html"


@dataclass
class Figure:
    id: str
    title: str
    svg: Markup | None
    note: str = ""
    empty: str = "Nothing recorded."


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    written: Sequence[tuple[str, int, LongTable]] | None = None,
) -> Path:
    """Render the report of the run directory ``run_dir`` to ``out`` (default:
    ``run_dir/report.html``). Returns the file. A regular file is replaced atomically, a link
    is written through, ``/dev/stdout`` or a FIFO is written as a stream
    (:func:`gradscope.rundir.write_text`). ``written``: the chunks as the run's store kept them
    in memory (:func:`gradscope.report.data.read_report_data`).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory (a one-line message).
        OSError: ``out`` cannot be written.
    """
    path = Path(run_dir)
    data = read_report_data(path, written=written)
    html = render(data)
    return rundir.write_text(Path(out) if out is not None else path / REPORT, html)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """Jinja2 with autoescaping on every template (text from the run is never markup). One
    per process: the templates ship with the package and do not change while it runs, so they
    are read once (no reload checks)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("gradscope", "report"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        auto_reload=False,
    )


def render(data: ReportData) -> str:
    template = _environment().get_template("template.html")
    return str(
        template.render(
            version=__version__,
            title=data.path.name,
            status=data.progress.status_text,
            status_class=data.progress.state.replace(" ", "-"),
            header=_header(data),
            problems=data.problems,
            findings=_findings(data.findings),
            figures=_figures(data),
            remedies=_remedies(data.events),
            remedies_note=(
                "No remedy acted."
                if _remedy_options(data.events)
                else "No remedy was enabled (clip, guard, swap, recycle)."
            ),
            records=f"{data.records:,}",
            width=data.width,
        )
    )


def _header(data: ReportData) -> list[tuple[str, str]]:
    meta = data.meta
    rows: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            rows.append((key, str(value)))

    add("command", meta.get("command"))
    add("status", data.progress.status_text)
    add("exit code", meta.get("exit_code"))
    add("steps", data.progress.steps_text)
    add("step mode", meta.get("step_mode"))
    models = meta.get("models")
    if isinstance(models, dict):
        add("models", ", ".join(f"{k or '(first)'}: {v}" for k, v in models.items()))
    add("started", meta.get("started"))
    add("ended", meta.get("ended"))
    add("duration", _duration(meta.get("started"), meta.get("ended")))
    versions = [f"{k} {meta[k]}" for k in ("gradscope", "torch", "python") if meta.get(k)]
    add("versions", ", ".join(versions))
    add("platform", meta.get("platform"))
    add("working directory", meta.get("cwd"))
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        chosen = [
            f"{k}={cfg[k]}"
            for k in ("clip", "guard", "swap", "recycle")
            if cfg.get(k) not in (None, False, 0, [], "")
        ]
        add("remedies", ", ".join(chosen) or "none")
    add("note", meta.get("note"))
    add("run directory", str(data.path))
    return rows


def _duration(start: Any, end: Any) -> str | None:
    try:
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        secs = time.mktime(time.strptime(end, fmt)) - time.mktime(time.strptime(start, fmt))
    except (TypeError, ValueError):
        return None
    h, rem = divmod(int(secs), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"error": 0, "warning": 1, "info": 2}
    out = []
    for f in sorted(
        findings, key=lambda f: (order.get(str(f.get("severity")), 3), _int(f.get("first_step")))
    ):
        evidence = f.get("evidence") if isinstance(f.get("evidence"), dict) else {}
        out.append(
            {
                "severity": str(f.get("severity", "?")),
                "kind": str(f.get("kind", "?")),
                "layer": str(f.get("layer", "")),
                "others": [str(x) for x in f.get("layers", []) or [] if x != f.get("layer")],
                "steps": finding_steps(f),
                "message": str(f.get("message", "")),
                "suggestion": str(f.get("suggestion", "")),
                "evidence": [(str(k), _short(v)) for k, v in (evidence or {}).items()],
                "remedies": [_short(r) for r in f.get("remedies", []) or []],
            }
        )
    return out


def _int(v: Any) -> int:
    return v if isinstance(v, int) else 0


def _short(v: Any) -> str:
    if isinstance(v, float):
        return figures._fmt(v)
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _remedy_options(events: list[dict[str, Any]]) -> bool:
    return any(e.get("event") == "remedies" for e in events)


def _remedies(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for e in events:
        if e.get("event") != "remedy":
            continue
        details = {k: v for k, v in e.items() if k not in ("event", "remedy", "action", "step")}
        out.append(
            {
                "step": str(e.get("step", "")),
                "remedy": str(e.get("remedy", "")),
                "action": str(e.get("action", "")),
                "details": "; ".join(f"{k}={_short(v)}" for k, v in details.items()),
            }
        )
    return out


def _remedy_markers(events: list[dict[str, Any]]) -> list[tuple[float, str]]:
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


def _picked(names: list[str], findings: list[dict[str, Any]], limit: int = MAX_LINES) -> list[int]:
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


def _figures(data: ReportData) -> list[Figure]:
    steps = data.bin_steps()
    last = data.last_step + 1 if data.last_step >= 0 else 1
    figs: list[Figure] = []
    markers = _remedy_markers(data.events)

    # the gradient-flow heatmap
    names, idx = data.ordered("grad_norm")
    acc = data.acc["grad_norm"]
    if names:
        lm = acc.log_mean()[idx]
        bad = acc.nonfinite()[idx]
        figs.append(
            Figure(
                "gradient-flow",
                "Gradient flow",
                figures.heatmap(
                    lm,
                    bad,
                    names,
                    steps,
                    data.width,
                    cmap="viridis",
                    label="log10 ‖g‖",
                    title="gradient norm per parameter and step",
                ),
                "log10 of each parameter's gradient norm (geometric mean over each bin), "
                "parameters in forward order from top (input) to bottom (output); magenta: a "
                "NaN/Inf gradient in the bin; grey: not recorded.",
            )
        )
        mean, peak = acc.whole_run()
        pick = _picked(names, data.findings)
        series = [(names[i], steps, 10 ** lm[i]) for i in pick]
        nf_steps = [float(s) for s in steps[bad.any(axis=0)]]
        figs.append(
            Figure(
                "grad-norms",
                "Gradient norm per layer",
                figures.line_chart(
                    series,
                    log_y=True,
                    x_max=last,
                    y_label="‖g‖",
                    title="gradient norms",
                    markers=markers,
                    bad_x=nf_steps,
                ),
                f"{len(pick)} of {len(names)} parameters (those with findings, then evenly "
                "spaced in forward order)"
                if len(pick) < len(names)
                else "",
            )
        )
        nbad = acc.nonfinite_count()[idx]
        order = list(range(len(names)))
        note = ""
        if len(names) > MAX_BARS:
            # layers with NaN/Inf first, then the largest gradients
            key = np.where(nbad > 0, np.inf, np.nan_to_num(peak[idx], nan=-1.0))
            order = sorted(np.argsort(-key, kind="stable")[:MAX_BARS].tolist())
            note = (
                f"the {MAX_BARS} parameters with NaN/Inf or the largest gradients, of {len(names)}"
            )
        figs.append(
            Figure(
                "grad-bars",
                "Mean and largest gradient norm per layer",
                figures.bar_chart(
                    [names[i] for i in order],
                    mean[idx][order],
                    peak[idx][order],
                    title="gradient norm per layer",
                    label="‖g‖",
                    nonfinite=nbad[order],
                ),
                (note + "; " if note else "") + "over the finite values; magenta: NaN/Inf "
                "gradients (how many)"
                if nbad.any()
                else note,
            )
        )
    else:
        figs.append(
            Figure("gradient-flow", "Gradient flow", None, empty="No gradient norms recorded.")
        )

    total = run_series(data, "grad_norm_total")
    if total is not None:
        x, y, bad_t, _ = total
        series = [("total", x, y)]
        clipped = run_series(data, "grad_norm_total_clipped")
        if clipped is not None:
            series.append(("after clipping", clipped[0], clipped[1]))
        figs.append(
            Figure(
                "grad-total",
                "Total gradient norm",
                figures.line_chart(
                    series,
                    log_y=True,
                    x_max=last,
                    y_label="‖g‖ total",
                    title="total gradient norm",
                    markers=markers,
                    bad_x=[float(s) for s in x[bad_t]],
                ),
            )
        )

    names, idx = data.ordered("update_ratio")
    if names:
        acc = data.acc["update_ratio"]
        lm = acc.log_mean()[idx]
        pick = _picked(names, data.findings)
        bad_u = acc.nonfinite()[idx].any(axis=0)
        figs.append(
            Figure(
                "update-ratios",
                "Update ratio ‖Δw‖/‖w‖",
                figures.line_chart(
                    [(names[i], steps, 10 ** lm[i]) for i in pick],
                    log_y=True,
                    x_max=last,
                    y_label="‖Δw‖/‖w‖",
                    title="update ratios",
                    markers=markers,
                    bad_x=[float(x) for x in steps[bad_u]],
                ),
                "around 1e-3 is the usual healthy band (CS231n); far above, the learning rate is "
                "too high for the layer; far below, the layer barely learns.",
            )
        )

    for metric, fid, title, cmap, label in (
        ("act_dead_fraction", "dead-units", "Dead units (fraction per activation)", "Reds", "dead"),
        (
            "act_saturation",
            "saturation",
            "Saturated units (fraction per activation)",
            "Oranges",
            "saturated",
        ),
    ):
        names, idx = data.ordered(metric)
        if not names:
            continue
        acc = data.acc[metric]
        values, bad = _held(acc.mean()[idx], acc.nonfinite()[idx] | data.site_nonfinite(names))
        figs.append(
            Figure(
                fid,
                title,
                figures.heatmap(
                    values,
                    bad,
                    names,
                    steps,
                    data.width,
                    cmap=cmap,
                    vmin=0.0,
                    vmax=1.0,
                    label=label,
                    title=title,
                ),
                "sampled every activation_every steps, each sample held until the next; "
                "activations in forward order; magenta: NaN/Inf in the activation (its fraction "
                "means nothing there); grey: not sampled yet",
            )
        )

    loss = run_series(data, "loss")
    if loss is not None:
        x, y, bad_l, _ = loss
        figs.append(
            Figure(
                "loss",
                "Loss",
                figures.line_chart(
                    [("loss", x, y)],
                    log_y=bool(np.all(y[np.isfinite(y)] > 0)),
                    x_max=last,
                    y_label="loss",
                    title="loss",
                    markers=markers,
                    bad_x=[float(s) for s in x[bad_l]],
                ),
                "mean per bin; dashed lines: remedy actions; magenta ticks: NaN/Inf loss",
            )
        )
    else:
        figs.append(Figure("loss", "Loss", None, empty="No loss recorded."))
    return figs


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
