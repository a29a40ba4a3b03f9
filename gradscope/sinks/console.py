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


def print_summary(run: Run, console: Any = None) -> None:
    """Print the run header and the per-layer table."""
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
    for row in layer_rows(run):
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
    console.print(
        "grad norm, upd ratio (||Δw||/||w||), out grad (backward signal): medians over steps; "
        "nonfinite: gradient elements, summed; dead, sat (saturated): last sampled step"
    )
    for problem in run.problems:
        console.print(f"[yellow]note:[/] {problem}")
