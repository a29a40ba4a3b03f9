"""The HTML report: one self-contained file (inline CSS, inline SVG and PNG figures, no script,
nothing fetched), rendered with Jinja2 with autoescaping on, so text from the run (a layer named
``<img src=x onerror=alert(1)>`` by a ModuleDict key) is shown as text."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from .. import __version__, rundir
from ..load import finding_steps
from . import figures
from .data import ReportData, read_report_data
from .specs import Bars, Heatmap, Lines, Plot, report_panels

if TYPE_CHECKING:
    import jinja2

    from ..records import LongTable

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


# each kind of spec and the function that draws it as SVG: its fields are that function's
# arguments (report/mpl.py draws the same specs with matplotlib)
_SVG: dict[str, Callable[..., Markup]] = {
    Heatmap.kind: figures.heatmap,
    Lines.kind: figures.line_chart,
    Bars.kind: figures.bar_chart,
}


def svg(plot: Plot) -> Markup:
    """A figure's spec drawn as the report's inline SVG (:mod:`gradscope.report.figures`)."""
    return _SVG[plot.kind](**{f.name: getattr(plot, f.name) for f in dataclasses.fields(plot)})


def _figures(data: ReportData) -> list[Figure]:
    return [
        Figure(p.id, p.title, svg(p.plot) if p.plot is not None else None, p.note, p.empty)
        for p in report_panels(data)
    ]
