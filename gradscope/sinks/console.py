"""The terminal: a per-layer summary of a run as a rich table (imported on demand)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..load import Run


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:.2g}"


def layer_rows(run: Run) -> list[dict[str, Any]]:
    """One row per watched module, in forward order: the numbers the summary table shows.

    A module's gradient norm is that of all its parameters together (``sqrt(sum ||g_p||^2)``),
    per step, then the median over steps; its update ratio is the median over its parameters'.
    """
    df = run.metrics
    if df.empty:
        return []
    params: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for entry in run.meta.get("layers", []):
        if entry["kind"] == "param":
            params.setdefault(entry["module"], []).append(entry["name"])
        else:
            types[entry["name"]] = entry["type"]
    p = df[df["kind"] == "param"]
    grad = p[p["metric"] == "grad_norm"]
    grad_sq = (grad.assign(sq=grad["value"] ** 2)
               .groupby(["layer", "step"])["sq"].sum())
    m = df[df["kind"] == "module"]
    last = m.sort_values("step").groupby(["layer", "metric"])["value"].last()
    median = m.groupby(["layer", "metric"])["value"].median()
    nonfinite = p[p["metric"] == "grad_nonfinite"].groupby("layer")["value"].sum()
    ratio = p[p["metric"] == "update_ratio"].groupby("layer")["value"].median()

    rows = []
    for site in run.layer_order:
        base = site.split("#")[0]
        if base not in types:
            continue
        names = params.get(site, [])
        norm = None
        if names:
            per_step = grad_sq[grad_sq.index.get_level_values(0).isin(names)]
            if len(per_step):
                norm = float(per_step.groupby(level=1).sum().pow(0.5).median())
        ratios = [ratio[n] for n in names if n in ratio]
        rows.append(
            {
                "layer": site,
                "type": types[base],
                "grad_norm": norm,
                "update_ratio": float(sorted(ratios)[len(ratios) // 2]) if ratios else None,
                "nonfinite": float(sum(nonfinite.get(n, 0.0) for n in names)) if names else None,
                "output_grad": median.get((site, "output_grad_norm")),
                "dead": last.get((site, "act_dead_fraction")),
                "saturated": last.get((site, "act_saturation")),
            }
        )
    return rows


def worst_rows(rows: list[dict[str, Any]], findings: list[dict[str, Any]], top: int
               ) -> list[dict[str, Any]]:
    """The ``top`` rows that most need a look, kept in forward order: layers named by a finding
    first, then non-finite gradients, then the most dead or saturated units, then the gradient
    norms furthest (in log10) from the median layer's."""
    if top <= 0 or len(rows) <= top:
        return rows
    flagged = {str(f.get("layer")) for f in findings}
    norms = [math.log10(r["grad_norm"]) for r in rows
             if isinstance(r["grad_norm"], float) and r["grad_norm"] > 0]
    mid = sorted(norms)[len(norms) // 2] if norms else 0.0

    def score(r: dict[str, Any]) -> tuple[float, ...]:
        g = r["grad_norm"]
        off = abs(math.log10(g) - mid) if isinstance(g, float) and g > 0 else 0.0
        frac = max((v for v in (r["dead"], r["saturated"]) if isinstance(v, float)
                    and not math.isnan(v)), default=0.0)
        return (float(r["layer"] in flagged or r["layer"].split("#")[0] in flagged),
                float((r["nonfinite"] or 0) > 0), frac, off)

    keep = set(sorted(range(len(rows)), key=lambda i: score(rows[i]), reverse=True)[:top])
    return [r for i, r in enumerate(rows) if i in keep]


def print_summary(run: Run, console: Any = None, top: int = 0) -> None:
    """Print the run header and the per-layer table (``top``: only the layers that most need a
    look, see :func:`worst_rows`; 0: every layer)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    meta = run.meta
    console.print(
        f"[bold]gradscope[/] {run.path}\n"
        f"status={meta.get('status', '?')}  steps={meta.get('steps', '?')}  "
        f"torch={meta.get('torch', '?')}"
    )
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("type", no_wrap=True)
    for title in ("grad norm", "upd ratio", "nonfinite", "out grad", "dead", "sat"):
        table.add_column(title, justify="right", no_wrap=True)
    all_rows = layer_rows(run)
    shown = worst_rows(all_rows, run.findings, top)
    for row in shown:
        table.add_row(
            row["layer"],
            row["type"],
            _fmt(row["grad_norm"]),
            _fmt(row["update_ratio"]),
            "-" if row["nonfinite"] is None else f"{row['nonfinite']:.0f}",
            _fmt(row["output_grad"]),
            _fmt(row["dead"], pct=True),
            _fmt(row["saturated"], pct=True),
        )
    console.print(table)
    if len(shown) < len(all_rows):
        console.print(f"the {len(shown)} of {len(all_rows)} layers that most need a look "
                      "(findings, NaN/Inf, dead or saturated units, extreme gradient norms), "
                      "in forward order; --top 0 shows all")
    console.print(
        "grad norm, upd ratio (||Δw||/||w||), out grad (backward signal): medians over steps; "
        "nonfinite: gradient elements, summed; dead, sat (saturated): last sampled step"
    )
    for problem in run.problems:
        console.print(f"[yellow]note:[/] {problem}")
    findings = run.findings
    if findings:
        console.print(f"\n[bold]{len(findings)} finding(s)[/]")
        print_findings(findings, console)
    else:
        console.print("\nno findings")


def print_findings(findings: list[dict[str, Any]], console: Any = None) -> None:
    """The findings as a rich table: severity, kind, layer, steps, what and what to try."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    if not findings:
        return
    table = Table(show_edge=False, header_style="bold", pad_edge=False, show_lines=True)
    for title in ("severity", "finding", "layer", "steps"):
        table.add_column(title, no_wrap=True)
    table.add_column("what happened / what to try", overflow="fold")
    order = {"error": 0, "warning": 1, "info": 2}
    for f in sorted(findings, key=lambda f: (order.get(f["severity"], 3), f["first_step"])):
        color = {"error": "red", "warning": "yellow"}.get(f["severity"], "cyan")
        steps = str(f["first_step"]) if f["first_step"] == f["last_step"] else \
            f"{f['first_step']}-{f['last_step']}"
        table.add_row(f"[{color}]{f['severity']}[/]", f["kind"], str(f["layer"]), steps,
                      f"{f['message']}\n[dim]try:[/] {f['suggestion']}")
    console.print(table)


class FindingPrinter:
    """Tells the user about findings on stderr: one line when raised (at most ``burst`` lines
    per ``window`` seconds; the rest are counted and mentioned in the summary), and a table at
    the end of the run. Quiet: nothing at all (the run directory still has everything)."""

    def __init__(self, quiet: bool = False, burst: int = 5, window: float = 60.0) -> None:
        self.quiet = quiet
        self.burst = burst
        self.window = window
        self._times: list[float] = []
        self.suppressed = 0

    def announce(self, finding: dict[str, Any], new: bool) -> None:
        import sys
        import time

        if self.quiet:
            return
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < self.window]
        if len(self._times) >= self.burst:
            self.suppressed += 1
            return
        self._times.append(now)
        what = "" if new else " (update)"
        line = (f"gradscope: {finding['severity']}{what}: {finding['kind']} at "
                f"{finding['layer']}, step {finding['first_step']}: {finding['message']}. "
                f"Try: {finding['suggestion']}")
        print(line, file=sys.stderr, flush=True)

    def summary(
        self, findings: list[dict[str, Any]], steps: int, run_dir: Any, status: str
    ) -> None:
        import contextlib
        import sys

        if self.quiet:
            return
        # the terminal is a courtesy: never fail close() over it
        with contextlib.suppress(Exception):
            if findings:
                print_findings(findings)
        errors = sum(f.get("severity") == "error" for f in findings)
        more = f" ({self.suppressed} not printed as they came)" if self.suppressed else ""
        with contextlib.suppress(Exception):
            print(f"gradscope: {len(findings)} finding(s), {errors} error(s){more} in {steps} "
                  f"steps, run {status}: {run_dir}", file=sys.stderr, flush=True)
