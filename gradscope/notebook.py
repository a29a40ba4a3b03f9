"""Jupyter notebooks: rich display, a live view updated at each flush, and cells that are re-run
or interrupted (``docs/notebooks.md``).

Nothing here imports IPython: every function looks for an IPython that is already running
(``sys.modules``), so a script, ``gradscope run`` and ``import gradscope`` never load it.

* :func:`summary_html` is what a :class:`~gradscope.scope.Scope` or a loaded
  :class:`~gradscope.load.Run` shows in a notebook (``_repr_html_``): status, steps, the
  findings with what to try, and a small gradient-flow heatmap as an inline PNG.
* :class:`LiveView` takes the terminal's place in a Jupyter kernel: instead of a line on stderr
  per finding, one display area that each flush updates in place (steps done, the layers to look
  at, the findings so far), and the summary in it at the end. It runs only at flushes: nothing
  on the per-step path.
* :class:`Cells` follows the cells of an IPython shell (a kernel or a terminal IPython): which
  cell opened a scope, and how each cell that trained a scope ended (completed, failed,
  interrupted by the stop button). ``watch()`` uses it to close the scope that an earlier run
  of the same cell, or an earlier ``watch()`` of the same model, left open
  (:func:`gradscope.scope.supersede`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .sinks.console import FindingPrinter, layers_text

if TYPE_CHECKING:
    from .load import Run
    from .records import LongTable
    from .report.data import ReportData

HEAT_COLS = 160  # step bins of the inline heatmap
HEAT_WIDTH = 480  # its size in pixels, at most (rows take 2-12 pixels each)
HEAT_HEIGHT = 200
WORST = 5  # layers in the live view's "look at" table
MAX_FINDINGS = 12  # rows of a findings table in a notebook (the report has them all)


# -- the running IPython ---------------------------------------------------------------------------
def ipython() -> Any | None:
    """The IPython shell running this process (a Jupyter kernel, a terminal IPython), if IPython
    is already imported and a shell exists; None otherwise (never imports IPython)."""
    mod = sys.modules.get("IPython")
    get = getattr(mod, "get_ipython", None)
    if get is None:
        return None
    try:
        return get()
    except Exception:
        return None


def in_kernel(shell: Any | None = None) -> bool:
    """Whether ``shell`` (default: the running one) is a Jupyter kernel's (Jupyter, Colab,
    Kaggle, VS Code), whose front end renders HTML; a terminal IPython is not."""
    shell = ipython() if shell is None else shell
    return shell is not None and getattr(shell, "kernel", None) is not None


# -- cells -----------------------------------------------------------------------------------------
class Cells:
    """The cells an IPython shell runs, as far as gradscope needs them.

    A cell is known by its front end's cell id where the front end sends one (JupyterLab,
    Notebook 7, VS Code), else by a hash of its source: a cell run again with the same source
    is the same cell. ``execution`` counts the cells run since gradscope first looked, so two
    runs of one cell differ.

    Each open scope registered with :meth:`follow` hears how every cell in which it trained
    ended (``Scope._cell_ended``).
    """

    _instance: Cells | None = None

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.execution = 0
        self._key = _current_key(shell)
        self._scopes: weakref.WeakSet[Any] = weakref.WeakSet()
        shell.events.register("pre_run_cell", self._pre_run_cell)
        shell.events.register("post_run_cell", self._post_run_cell)

    @classmethod
    def get(cls) -> Cells | None:
        """The cells of the running IPython shell; None outside IPython."""
        shell = ipython()
        if shell is None or getattr(shell, "events", None) is None:
            return None
        if cls._instance is None or cls._instance.shell is not shell:
            cls._instance = cls(shell)
        return cls._instance

    def here(self) -> tuple[str | None, int]:
        """The cell running now: (its key, which run of a cell this is)."""
        return self._key, self.execution

    def follow(self, scope: Any) -> None:
        self._scopes.add(scope)

    def _pre_run_cell(self, info: Any) -> None:
        cell_id = getattr(info, "cell_id", None)
        raw = getattr(info, "raw_cell", None)
        if cell_id:
            self._key = f"id:{cell_id}"
        elif isinstance(raw, str):
            self._key = _code_key(raw)
        else:
            self._key = _current_key(self.shell)

    def _post_run_cell(self, result: Any) -> None:
        error = getattr(result, "error_in_exec", None)
        try:
            for scope in list(self._scopes):
                # each scope guards itself: one failing never stops the others hearing
                with contextlib.suppress(Exception):
                    scope._cell_ended(error)
        finally:
            self.execution += 1


def _code_key(code: str) -> str:
    return "code:" + hashlib.sha1(code.encode("utf-8", "replace")).hexdigest()[:16]


def _current_key(shell: Any) -> str | None:
    """The running cell's key when gradscope starts listening in the middle of it: from the
    kernel's request (the front end's cell id, or the code), else from the input history (the
    cell is stored there before it runs)."""
    with contextlib.suppress(Exception):
        kernel = getattr(shell, "kernel", None)
        if kernel is not None:
            get_parent = getattr(kernel, "get_parent", None)
            parent = get_parent() if get_parent is not None else kernel._parent_header
            cell_id = (parent.get("metadata") or {}).get("cellId")
            if cell_id:
                return f"id:{cell_id}"
            code = (parent.get("content") or {}).get("code")
            if isinstance(code, str):
                return _code_key(code)
    with contextlib.suppress(Exception):
        raw = shell.history_manager.input_hist_raw
        if raw and isinstance(raw[-1], str):
            return _code_key(raw[-1])
    return None


# -- HTML ------------------------------------------------------------------------------------------
_STYLE = {
    "table": "border-collapse:collapse;margin:4px 0;font-size:12px",
    "th": "text-align:left;padding:2px 8px;border-bottom:1px solid #999",
    "td": "text-align:left;padding:2px 8px;vertical-align:top;border-bottom:1px solid #ddd",
}
_SEVERITY_COLOR = {"error": "#c0392b", "warning": "#b9770e", "info": "#2e86c1"}
_STATE_COLOR = {
    "completed": "#1e8449",
    "running": "#2e86c1",
    "failed": "#c0392b",
    "interrupted": "#b9770e",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(head: list[str], rows: Iterable[list[str]], cls: str) -> str:
    """An HTML table; ``rows`` hold HTML already escaped."""
    th = "".join(f'<th style="{_STYLE["th"]}">{_e(h)}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_STYLE["td"]}">{c}</td>' for c in row) + "</tr>"
        for row in rows
    )
    return (
        f'<table class="{cls}" style="{_STYLE["table"]}"><thead><tr>{th}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _layers(f: dict[str, Any]) -> str:
    """The layers of a finding as the report's rows hold it (``report.html._findings``)."""
    return layers_text({"layer": f["layer"], "layers": [f["layer"], *f["others"]]})


def findings_table(findings: list[dict[str, Any]], limit: int = MAX_FINDINGS) -> str:
    """The findings as an HTML table (class ``gradscope-findings``): severity, kind, layer,
    steps, what was seen and what to try; errors first, then by step."""
    from .report.html import _findings

    if not findings:
        return '<p class="gradscope-findings">No findings.</p>'
    rows = []
    shown = _findings(findings)
    for f in shown[:limit]:
        color = _SEVERITY_COLOR.get(f["severity"], "#555")
        layer = _e(_layers(f))
        rows.append(
            [
                f'<span style="color:{color};font-weight:bold">{_e(f["severity"])}</span>',
                f"<code>{_e(f['kind'])}</code>",
                f"<code>{layer}</code>",
                _e(f["steps"]),
                _e(f["message"]),
                _e(f["suggestion"]),
            ]
        )
    more = (
        f"<p>… and {len(shown) - limit} more (all of them: findings.json, report.html).</p>"
        if len(shown) > limit
        else ""
    )
    head = ["severity", "finding", "layer", "steps", "what was seen", "what to try"]
    return _table(head, rows, "gradscope-findings") + more


def heatmap_png(data: ReportData) -> tuple[str, str, str] | None:
    """The report's gradient-flow heatmap of ``data`` (the same spec, the same pixels:
    :func:`gradscope.report.specs.heatmap_spec`) as a small PNG ``data:`` URI, each cell
    scaled up to a few pixels, with the first and last parameter's names. None when no
    gradient norm was recorded."""
    from .report import figures
    from .report.specs import Heatmap, heatmap_spec

    if not data.ordered("grad_norm")[0] or data.cols == 0:
        return None
    spec = heatmap_spec(data, "grad_norm").plot
    assert isinstance(spec, Heatmap)
    rgb = figures.colorize(spec.values, spec.bad, spec.cmap, *spec.value_range())
    rows, cols = spec.values.shape
    sx = max(1, HEAT_WIDTH // cols)
    sy = max(2, min(12, HEAT_HEIGHT // rows))
    rgb = np.repeat(np.repeat(rgb, sy, axis=0), sx, axis=1)
    return figures.png_data_uri(rgb), spec.rows[0], spec.rows[-1]


def summary_html(
    *,
    name: str,
    state: str,
    steps: int,
    findings: list[dict[str, Any]],
    path: str,
    data: ReportData | None,
    note: str = "",
) -> str:
    """What a scope or a run shows in a notebook (class ``gradscope``): the header, the
    findings table, and the gradient-flow heatmap (when ``data`` has gradient norms)."""
    errors = sum(f.get("severity") == "error" for f in findings)
    color = _STATE_COLOR.get(state, "#555")
    parts = [
        '<div class="gradscope" style="font-family:sans-serif;font-size:13px">',
        f"<div><b>gradscope</b> run <code>{_e(name)}</code> · "
        f'<span class="gradscope-state" style="color:{color};font-weight:bold">{_e(state)}'
        f"</span> · {steps:,} steps · {len(findings)} finding(s), {errors} error(s)</div>",
        f'<div style="color:#666;font-size:11px"><code>{_e(path)}</code></div>',
    ]
    if note:
        parts.append(f'<div class="gradscope-note" style="color:#b9770e">{_e(note)}</div>')
    parts.append(findings_table(findings))
    heat = None
    last_step = 0
    if data is not None:
        last_step = max(data.last_step, 0)
        with contextlib.suppress(Exception):  # the picture is a courtesy
            heat = heatmap_png(data)
    if heat is not None:
        uri, first, last = heat
        parts.append(
            '<figure class="gradscope-heatmap" style="margin:4px 0">'
            f'<img src="{uri}" alt="gradient flow" style="image-rendering:pixelated;'
            f'max-width:{HEAT_WIDTH}px;border:1px solid #444"/>'
            '<figcaption style="font-size:11px;color:#666">gradient flow: log10 ‖g‖ per '
            f"parameter (rows, <code>{_e(first)}</code> at the top, <code>{_e(last)}</code> at "
            f"the bottom) and step (steps 0-{last_step:,} left to right); "
            "magenta: NaN/Inf; grey: not recorded</figcaption></figure>"
        )
    parts.append("</div>")
    return "".join(parts)


def run_html(run: Run) -> str:
    """:func:`summary_html` of a loaded run (from what was loaded: the directory may have
    moved since)."""
    from .report.data import run_report_data

    data = None
    if (run.metrics["metric"] == "grad_norm").any():
        data = run_report_data(run, ["grad_norm"], max_cols=HEAT_COLS)
    return summary_html(
        name=run.path.name,
        state=run.state,
        steps=run.steps,
        findings=run.findings,
        path=str(run.path),
        data=data,
    )


def fallback_html(text: str, exc: BaseException) -> str:
    """What a rich display shows when building it failed: the plain repr and why."""
    return f"<pre>{_e(text)}</pre><p>(gradscope: no rich display: {_e(repr(exc))})</p>"


# -- the live view ---------------------------------------------------------------------------------
def worst_layers(table: LongTable, limit: int = WORST) -> list[list[str]]:
    """The layers to look at in the latest records: each parameter's last gradient norm, by
    how far it lies from the median of all (in decades), and the activations with the most
    dead or saturated units. Rows of escaped HTML: layer, what, value."""
    cols = table.columns
    n = len(table)
    if not n:
        return []
    # each column's last value (rows come in step order)
    last = np.full(len(cols), np.nan)
    rev = table.col[::-1]
    uniq, first_rev = np.unique(rev, return_index=True)
    last[uniq] = table.value[::-1][first_rev]
    grads = [(c[0], last[i]) for i, c in enumerate(cols) if c[2] == "grad_norm" and c[1] == "param"]
    rows: list[tuple[float, list[str]]] = []
    finite = [v for _, v in grads if np.isfinite(v) and v > 0]
    if finite:
        median = float(np.median(finite))
        for layer, v in grads:
            if not np.isfinite(v):
                rows.append((np.inf, [f"<code>{_e(layer)}</code>", "gradient norm", _e(v)]))
            elif v > 0:
                off = float(np.log10(v / median))
                if abs(off) >= 1:
                    rows.append(
                        (
                            abs(off),
                            [
                                f"<code>{_e(layer)}</code>",
                                "gradient norm",
                                f"{v:.3g} ({10**off:.2g}× the median layer's)",
                            ],
                        )
                    )
    for metric, what in (("act_dead_fraction", "dead units"), ("act_saturation", "saturated")):
        for i, c in enumerate(cols):
            v = last[i]
            if c[2] == metric and np.isfinite(v) and v >= 0.25:
                rows.append((v, [f"<code>{_e(c[0])}</code>", what, f"{v:.0%}"]))
    rows.sort(key=lambda r: -r[0])
    return [r for _, r in rows[:limit]]


class LiveView(FindingPrinter):
    """The run's display area in a Jupyter notebook, in place of the terminal's lines: updated
    at each flush (steps done, the layers to look at, the findings so far) and at the end (the
    summary with the heatmap). A cell that trains a scope opened in an earlier cell gets its own
    area; the earlier one keeps its last state.

    Args:
        name: The run's name.
        run_dir: The run directory.
        cells: The shell's cells (which cell is running).
        final: Builds the summary shown at the end (the scope's rich display).
    """

    def __init__(
        self, name: str, run_dir: str, cells: Cells | None, final: Callable[[], str]
    ) -> None:
        super().__init__(quiet=False)
        self.name = name
        self.run_dir = run_dir
        self.cells = cells
        self._final = final
        self._handle: Any = None
        self._where: int | None = None  # the cell run the display area is in
        self.broken = False  # the display failed: back to the terminal's lines
        # the last show goes to the area there is, whichever cell runs (a run that a new
        # watch() closes: its summary belongs with it, not under the cell that replaced it)
        self.in_place = False
        self.actions: list[str] = []
        self._worst: list[list[str]] = []

    # FindingPrinter's moments: nothing on stderr, the display shows them (once the display
    # failed, the terminal's lines are back)
    def announce(self, finding: Mapping[str, Any], new: bool) -> None:
        if self.broken:
            super().announce(finding, new)

    def remedy(self, finding: Mapping[str, Any], action: Mapping[str, Any]) -> None:
        if self.broken:
            super().remedy(finding, action)
            return
        what = action.get("action")
        if what in ("swapped", "recycled"):
            self.actions.append(
                f"step {action.get('step')}: {what} {action.get('layer')} ({finding.get('kind')})"
            )

    def summary(
        self, findings: list[dict[str, Any]], steps: int, run_dir: Any, status: str
    ) -> None:
        if not self.broken:
            with contextlib.suppress(Exception):
                self.show(self._final(), plain_text(self.name, status, steps, findings))
                return
        super().summary(findings, steps, run_dir, status)

    # the live part
    def flushed(
        self, table: LongTable | None, findings: list[dict[str, Any]], steps: int, note: str
    ) -> None:
        """A flush wrote records: show where the run stands (``note``: why the last training
        cell stopped, if training has not gone on since)."""
        if table is not None:
            self._worst = worst_layers(table)
        self.show(*self.live(findings, steps, "running", note))

    def live(
        self, findings: list[dict[str, Any]], steps: int, state: str, note: str = ""
    ) -> tuple[str, str]:
        """Where the run stands, as HTML and as plain text (for a front end without HTML:
        ``jupyter console``)."""
        text = plain_text(self.name, state, steps, findings, note)
        return self.live_html(findings, steps, state, note), text

    def live_html(
        self, findings: list[dict[str, Any]], steps: int, state: str, note: str = ""
    ) -> str:
        parts = [
            '<div class="gradscope gradscope-live" style="font-family:sans-serif;font-size:13px">',
            f"<div><b>gradscope</b> <code>{_e(self.name)}</code> · "
            f'<span class="gradscope-state" style="color:{_STATE_COLOR.get(state, "#555")};'
            f'font-weight:bold">{_e(state)}</span> · {steps:,} steps · '
            f"{len(findings)} finding(s) so far</div>",
        ]
        if note:
            parts.append(f'<div class="gradscope-note" style="color:#b9770e">{_e(note)}</div>')
        if self._worst:
            parts.append(
                '<div style="margin-top:4px">Layers to look at (last flush):</div>'
                + _table(["layer", "what", "value"], self._worst, "gradscope-worst")
            )
        parts.append(findings_table(findings))
        if self.actions:
            parts.append("<div>Remedies: " + "; ".join(_e(a) for a in self.actions[-5:]) + "</div>")
        parts.append(
            f'<div style="color:#666;font-size:11px"><code>{_e(self.run_dir)}</code></div></div>'
        )
        return "".join(parts)

    def show(self, markup: str, text: str = "") -> None:
        """Put ``markup`` (and ``text``, its plain version) in this cell's display area (a new
        one in a new cell)."""
        try:
            self._show({"text/html": markup, "text/plain": text or f"gradscope {self.name}"})
        except Exception:
            self.broken = True  # the terminal's lines from now on; the guard reports it once
            raise

    def _show(self, bundle: dict[str, str]) -> None:
        import importlib

        shown: Any = importlib.import_module("IPython.display")  # (untyped: as Any)
        here = self.cells.execution if self.cells is not None else None
        if self._handle is None or (here != self._where and not self.in_place):
            self._handle = shown.display(bundle, raw=True, display_id=True)
            self._where = here
        else:
            self._handle.update(bundle, raw=True)


def plain_text(
    name: str, state: str, steps: int, findings: list[dict[str, Any]], note: str = ""
) -> str:
    """The live view and the summary for a front end that shows no HTML: one line for the run,
    one per finding (as many as the HTML table), the note."""
    from .report.html import _findings

    lines = [f"gradscope {name}: {state}, {steps:,} steps, {len(findings)} finding(s)"]
    if note:
        lines.append(f"  {note}")
    shown = _findings(findings)
    for f in shown[:MAX_FINDINGS]:
        layer = _layers(f)
        lines.append(
            f"  {f['severity']}: {f['kind']} at {layer}, steps {f['steps']}. Try: {f['suggestion']}"
        )
    if len(shown) > MAX_FINDINGS:
        lines.append(f"  ... and {len(shown) - MAX_FINDINGS} more (findings.json)")
    return "\n".join(lines)


def png_bytes(uri: str) -> bytes:
    """The PNG of a ``data:image/png;base64,`` URI (tests and callers that save it)."""
    return base64.b64decode(uri.split(",", 1)[1])
