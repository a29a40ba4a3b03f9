"""``gradscope compare RUN_A RUN_B``: one self-contained page that overlays two runs, for
"before and after the fix": their findings side by side, the loss and total gradient norm on
shared axes, and per-layer gradient norms, update ratios and dead fractions matched by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, rundir
from ..load import finding_steps
from . import figures
from .data import ReportData, read_report_data, run_series
from .html import Figure, _environment, _header
from .specs import picked

MAX_LAYERS = 60  # layers in a paired bar chart


def write_compare(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    """Render the comparison of two run directories to ``out`` (a regular file is replaced
    atomically, a link written through, ``/dev/stdout`` or a FIFO written as a stream).

    Raises:
        FileNotFoundError: Either is not a run directory (a one-line message).
        OSError: ``out`` cannot be written.
    """
    a, b = read_report_data(Path(run_a)), read_report_data(Path(run_b))
    html = render_compare(a, b)
    return rundir.write_text(Path(out), html)


def _names(a: ReportData, b: ReportData) -> tuple[str, str]:
    na, nb = a.path.resolve().name, b.path.resolve().name
    if na == nb:
        na, nb = str(a.path), str(b.path)
    return na, nb


def render_compare(a: ReportData, b: ReportData) -> str:
    a_name, b_name = _names(a, b)
    ha, hb = dict(_header(a)), dict(_header(b))
    keys = list(dict.fromkeys([*ha, *hb]))
    header = [(k, ha.get(k, "-"), hb.get(k, "-")) for k in keys]
    problems = [f"A: {p}" for p in a.problems] + [f"B: {p}" for p in b.problems]
    return str(
        _environment()
        .get_template("compare.html")
        .render(
            version=__version__,
            a_name=a_name,
            b_name=b_name,
            header=header,
            problems=problems,
            findings_a=a.findings,
            findings_b=b.findings,
            finding_rows=_finding_rows(a, b),
            figures=_figures(a, b, ("A", "B")),  # the header names them
        )
    )


def _finding_rows(a: ReportData, b: ReportData) -> list[dict[str, str]]:
    def index(findings: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for f in findings:
            out.setdefault((str(f.get("kind")), str(f.get("layer"))), f)
        return out

    ia, ib = index(a.findings), index(b.findings)

    def cell(f: dict[str, Any] | None) -> str:
        if f is None:
            return "-"
        return f"{f.get('severity')} at steps {finding_steps(f)}: {f.get('message', '')}"

    keys = sorted(set(ia) | set(ib))
    return [
        {"kind": k, "layer": layer, "a": cell(ia.get((k, layer))), "b": cell(ib.get((k, layer)))}
        for k, layer in keys
    ]


def _run_lines(
    a: ReportData, b: ReportData, metric: str, labels: tuple[str, str]
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[float]]:
    """Each run's line of a run-level metric, and the steps where either had NaN/Inf."""
    out, bad = [], []
    for data, label in ((a, labels[0]), (b, labels[1])):
        s = run_series(data, metric)
        if s is not None:
            out.append((f"{label}", s[0], s[1]))
            bad += [float(x) for x in s[0][s[2]]]
    return out, sorted(set(bad))


def _per_layer(
    a: ReportData, b: ReportData, metric: str, how: str
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One number per layer and run (``mean`` of the finite values over the run, or the
    ``last`` bin with data: NaN if NaN/Inf was all that bin had), whether that run had NaN/Inf
    values there, the layers of both in A's forward order, then B's extra ones."""

    def values(data: ReportData) -> dict[str, tuple[float, bool]]:
        names, idx = data.ordered(metric)
        if not names:
            return {}
        acc = data.acc[metric]
        if how == "mean":
            vals = acc.whole_run()[0][idx]
            bad = acc.nonfinite_count()[idx] > 0
        else:
            m, nf = acc.mean()[idx], acc.nonfinite()[idx]
            if metric in ("act_dead_fraction", "act_saturation"):
                nf = nf | data.site_nonfinite(names)
            has = np.isfinite(m) | nf
            at = np.array([np.flatnonzero(row)[-1] if row.any() else -1 for row in has])
            rows = np.arange(len(names))
            vals = np.where((at >= 0) & ~nf[rows, at], m[rows, at], np.nan)
            bad = (at >= 0) & nf[rows, at]
        return {n: (float(v), bool(x)) for n, v, x in zip(names, vals, bad)}

    va, vb = values(a), values(b)
    names = list(dict.fromkeys([*va, *vb]))
    missing = (np.nan, False)
    return (
        names,
        np.array([va.get(n, missing)[0] for n in names]),
        np.array([vb.get(n, missing)[0] for n in names]),
        np.array([va.get(n, missing)[1] for n in names], dtype=bool),
        np.array([vb.get(n, missing)[1] for n in names], dtype=bool),
    )


def _figures(a: ReportData, b: ReportData, labels: tuple[str, str]) -> list[Figure]:
    last = max(a.last_step, b.last_step) + 1
    figs: list[Figure] = []
    for metric, fid, title, ylab in (
        ("loss", "loss", "Loss", "loss"),
        ("grad_norm_total", "grad-total", "Total gradient norm", "‖g‖ total"),
    ):
        series, bad = _run_lines(a, b, metric, labels)
        positive = all(np.all(y[np.isfinite(y)] > 0) for _, _, y in series)
        figs.append(
            Figure(
                fid,
                title,
                figures.line_chart(
                    series, log_y=positive, x_max=max(last, 1), y_label=ylab, title=title, bad_x=bad
                )
                if series
                else None,
                "mean per step bin of each run"
                + ("; magenta ticks: NaN/Inf in either run" if bad else ""),
            )
        )
    for metric, fid, title, how, log, unit, note in (
        (
            "grad_norm",
            "grad-bars",
            "Gradient norm per layer",
            "mean",
            True,
            "",
            "mean of the finite values over each run",
        ),
        (
            "update_ratio",
            "update-bars",
            "Update ratio per layer",
            "mean",
            True,
            "",
            "mean of the finite values over each run",
        ),
        (
            "act_dead_fraction",
            "dead-bars",
            "Dead units per activation",
            "last",
            False,
            "",
            "the last sample of each run",
        ),
        (
            "act_saturation",
            "saturation-bars",
            "Saturated units per activation",
            "last",
            False,
            "",
            "the last sample of each run",
        ),
    ):
        names, va, vb, bad_a, bad_b = _per_layer(a, b, metric, how)
        if not names:
            continue
        if len(names) > MAX_LAYERS:
            keep = picked(names, a.findings + b.findings, MAX_LAYERS)
            names, va, vb = [names[i] for i in keep], va[keep], vb[keep]
            bad_a, bad_b = bad_a[keep], bad_b[keep]
            note += f"; {MAX_LAYERS} layers (those with findings, then evenly spaced)"
        if bad_a.any() or bad_b.any():
            note += "; magenta: NaN/Inf values"
        figs.append(
            Figure(
                fid,
                title,
                figures.paired_bars(
                    names, va, vb, labels, log=log, title=title, unit=unit, bad_a=bad_a, bad_b=bad_b
                ),
                note,
            )
        )
    return figs
