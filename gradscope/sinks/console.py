"""The terminal: a per-layer summary of a run and its findings (imported on demand).

Numbers are never hidden: a column aggregated over values of which some were NaN/Inf reads
``nan 47/80`` (47 of its 80 values were not finite), never 0 or ``-`` (``-``: not recorded).
Tables too wide for the terminal turn into one block per layer or finding, wrapped to its
width. Text from the run (layer names, messages) is printed as text, never as rich markup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..load import finding_steps

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from ..load import Run

MIN_TEXT = 30  # narrower than this, the findings' text column makes way for stacked blocks
COLUMNS = (  # per-layer columns: row key, header, percent
    ("grad_norm", "grad norm", False),
    ("update_ratio", "upd ratio", False),
    ("nonfinite", "nonfinite", False),
    ("output_grad", "out grad", False),
    ("dead", "dead", True),
    ("saturated", "sat", True),
)


def _fmt(value: Any, pct: bool = False, bad: tuple[int, int] | None = None) -> str:
    """A number for the table: ``-`` not recorded, ``nan``/``inf`` as such (with how many of
    how many values were not finite, when known)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return f"{text} {bad[0]}/{bad[1]}" if bad else text
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:.2g}"


def _stats(keys: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    """Per key: the median of the finite values, the upper median (``sorted[n // 2]``, the
    value of one of them), how many values, how many not finite, and which non-finite value
    sums them up (NaN if any NaN or both infinities, else the infinity)."""
    import numpy as np
    import pandas as pd

    finite = np.isfinite(values)
    frame = pd.DataFrame(
        {
            "key": keys,
            "v": np.where(finite, values, np.nan),
            "bad": ~finite,
            "nan": np.isnan(values),
            "pos": values == np.inf,
            "neg": values == -np.inf,
        }
    )
    g = frame.groupby("key", sort=False)
    out = g.agg(
        median=("v", "median"),
        n=("v", "size"),
        bad=("bad", "sum"),
        nan=("nan", "any"),
        pos=("pos", "any"),
        neg=("neg", "any"),
    )
    srt = frame[finite].sort_values(["key", "v"], kind="stable")
    rank = srt.groupby("key", sort=False).cumcount().to_numpy()
    size = srt.groupby("key", sort=False)["v"].transform("size").to_numpy()
    out["upper"] = srt[rank == size // 2].set_index("key")["v"].reindex(out.index)
    out["worst"] = np.where(
        out["nan"] | (out["pos"] & out["neg"]), np.nan, np.where(out["pos"], np.inf, -np.inf)
    )
    return out


def _cells_of(
    stats: pd.DataFrame, column: str = "median"
) -> dict[Any, tuple[float, tuple[int, int] | None]]:
    """Per key: the finite aggregate, or the non-finite value and (bad, n)."""
    out: dict[Any, tuple[float, tuple[int, int] | None]] = {}
    for key, agg, worst, bad, n in zip(
        stats.index, stats[column], stats["worst"], stats["bad"], stats["n"]
    ):
        out[key] = (float(worst), (int(bad), int(n))) if bad > 0 else (float(agg), None)
    return out


def layer_rows(run: Run) -> list[dict[str, Any]]:
    """One row per watched module, in forward order: the numbers the summary table shows.

    A module's gradient norm is that of all its parameters together (``sqrt(sum ||g_p||^2)``),
    per step, then the median over steps; its update ratio is the median over its parameters'
    (of their medians over steps); nonfinite sums the parameters' ``grad_nonfinite``; out grad
    is the median of ``output_grad_norm`` over steps; dead and sat are the last sample. A
    value is NaN or Inf where any value under it was (a step with a NaN gradient makes the
    module's norm NaN at that step): ``row["bad"][column]`` then says how many of how many.
    Dead and sat are NaN when the sampled output itself had NaN/Inf (``act_nonfinite``).
    Vectorised: one groupby per metric, whatever the number of layers.
    """
    import numpy as np

    df = run.metrics
    if df.empty:
        return []
    with np.errstate(over="ignore", invalid="ignore"):  # 1e300 squared is inf, as it should
        return _layer_rows(run)


def _layer_rows(run: Run) -> list[dict[str, Any]]:
    import numpy as np
    import pandas as pd

    df = run.metrics
    module_of: dict[str, str] = {}
    types: dict[str, str] = {}
    for entry in run.meta.get("layers", []):
        if entry["kind"] == "param":
            module_of[entry["name"]] = entry["module"]
        else:
            types[entry["name"]] = entry["type"]
    kind, metric = df["kind"].to_numpy(), df["metric"].to_numpy()
    layer, step = df["layer"].to_numpy(), df["step"].to_numpy()
    value = df["value"].to_numpy(dtype=float)

    def rows_of(k: str, m: str) -> np.ndarray:
        return np.flatnonzero((kind == k) & (metric == m))

    def modules(names: Any) -> np.ndarray:
        """The module of each parameter name (``"\\0"``: none known)."""
        codes, uniq = pd.factorize(np.asarray(names, dtype=object))
        mapped = np.array([module_of.get(str(u), "\0") for u in uniq] + ["\0"], dtype=object)
        return np.asarray(mapped[codes])  # code -1 (none) picks the last

    # gradient norm: per module and step over its parameters, NaN if any was NaN
    g = rows_of("param", "grad_norm")
    sq = pd.DataFrame(
        {"m": modules(layer[g]), "s": step[g], "sq": value[g] ** 2, "nan": np.isnan(value[g])}
    )
    per_step = sq.groupby(["m", "s"], sort=False).agg(sq=("sq", "sum"), nan=("nan", "any"))
    norm = np.where(per_step["nan"], np.nan, np.sqrt(per_step["sq"].to_numpy()))
    grad = _cells_of(_stats(per_step.index.get_level_values(0).to_numpy(), norm))
    # update ratio: medians over steps per parameter, then the upper median over parameters
    u = rows_of("param", "update_ratio")
    per_param = _stats(layer[u], value[u])
    pm = per_param.assign(m=modules(per_param.index.to_numpy()))
    ratio = _cells_of(
        _stats(pm["m"].to_numpy(), np.where(pm["bad"] > 0, pm["worst"], pm["median"])), "upper"
    )
    ratio_bad = {
        m: (int(b), int(n)) for m, b, n in pm.groupby("m")[["bad", "n"]].sum().itertuples() if b > 0
    }
    # non-finite gradient elements, summed (NaN if a count itself is NaN)
    c = rows_of("param", "grad_nonfinite")
    counts = (
        pd.DataFrame({"m": modules(layer[c]), "v": value[c], "nan": np.isnan(value[c])})
        .groupby("m", sort=False)
        .agg(v=("v", "sum"), nan=("nan", "any"))
    )
    nonfinite = dict(zip(counts.index, np.where(counts["nan"], np.nan, counts["v"])))
    o = rows_of("module", "output_grad_norm")
    out_grad = _cells_of(_stats(layer[o], value[o]))
    last = _last_samples(layer, step, value, kind == "module", metric)

    rows = []
    none: tuple[float | None, tuple[int, int] | None] = (None, None)
    for site in run.layer_order:
        base = site.split("#")[0]
        if base not in types:
            continue
        bad: dict[str, tuple[int, int]] = {}
        norm_v, b = grad.get(site, none)
        if b:
            bad["grad_norm"] = b
        ratio_v, _ = ratio.get(site, none)
        if site in ratio_bad:
            bad["update_ratio"] = ratio_bad[site]
        og, b = out_grad.get(site, none)
        if b:
            bad["output_grad"] = b
        count = nonfinite.get(site)
        rows.append(
            {
                "layer": site,
                "type": types[base],
                "grad_norm": norm_v,
                "update_ratio": ratio_v,
                "nonfinite": None if count is None else float(count),
                "output_grad": og,
                "dead": last.get((site, "act_dead_fraction")),
                "saturated": last.get((site, "act_saturation")),
                "bad": bad,
            }
        )
    return rows


def _last_samples(
    layer: np.ndarray, step: np.ndarray, value: np.ndarray, module: np.ndarray, metric: np.ndarray
) -> dict[tuple[str, str], float]:
    """(site, metric) -> the value at the last step it was sampled (NaN if the output had
    NaN/Inf then: a fraction of NaN outputs means nothing)."""
    import numpy as np
    import pandas as pd

    want = module & np.isin(metric, ["act_dead_fraction", "act_saturation", "act_nonfinite"])
    frame = pd.DataFrame({"l": layer[want], "m": metric[want], "s": step[want], "v": value[want]})
    if frame.empty:
        return {}
    latest = frame.sort_values("s", kind="stable").drop_duplicates(["l", "m"], keep="last")
    garbage = frame[(frame["m"] == "act_nonfinite") & ~(frame["v"] == 0)]
    bad = set(zip(garbage["l"], garbage["s"]))
    out: dict[tuple[str, str], float] = {}
    for lay, met, s, v in latest.itertuples(index=False):
        if met != "act_nonfinite":
            out[(lay, met)] = math.nan if (lay, s) in bad else float(v)
    return out


def _has_nonfinite(r: dict[str, Any]) -> bool:
    n = r["nonfinite"]
    return (
        bool(r.get("bad"))
        or (isinstance(n, float) and (math.isnan(n) or n > 0))
        or any(isinstance(r[k], float) and not math.isfinite(r[k]) for k, _, _ in COLUMNS)
    )


def worst_rows(
    rows: list[dict[str, Any]], findings: list[dict[str, Any]], top: int
) -> list[dict[str, Any]]:
    """The ``top`` rows that most need a look, kept in forward order: layers named by a finding
    first, then NaN/Inf, then the most dead or saturated units, then the gradient norms
    furthest (in log10) from the median layer's."""
    if top <= 0 or len(rows) <= top:
        return rows
    flagged = {str(x) for f in findings for x in [f.get("layer"), *(f.get("layers") or [])]}

    def finite_pos(v: Any) -> bool:
        return isinstance(v, float) and math.isfinite(v) and v > 0

    norms = sorted(math.log10(r["grad_norm"]) for r in rows if finite_pos(r["grad_norm"]))
    mid = norms[len(norms) // 2] if norms else 0.0

    def score(r: dict[str, Any]) -> tuple[float, ...]:
        g = r["grad_norm"]
        off = abs(math.log10(g) - mid) if finite_pos(g) else 0.0
        frac = max(
            (v for v in (r["dead"], r["saturated"]) if isinstance(v, float) and math.isfinite(v)),
            default=0.0,
        )
        return (
            float(r["layer"] in flagged or r["layer"].split("#")[0] in flagged),
            float(_has_nonfinite(r)),
            frac,
            off,
        )

    keep = set(sorted(range(len(rows)), key=lambda i: score(rows[i]), reverse=True)[:top])
    return [r for i, r in enumerate(rows) if i in keep]


def _cells(row: dict[str, Any]) -> list[str]:
    bad = row.get("bad", {})
    out = []
    for key, _, pct in COLUMNS:
        v = row[key]
        if key == "nonfinite" and isinstance(v, float) and math.isfinite(v):
            out.append(f"{v:.0f}")
        else:
            out.append(_fmt(v, pct, bad.get(key)))
    return out


def _fits(console: Any, table: Any) -> bool:
    """The table's natural width (nothing wrapped or cut) fits the console."""
    return _natural_width(console, table) <= int(console.width)


def _natural_width(console: Any, table: Any) -> int:
    """How wide a table is when nothing in it is wrapped or cut."""
    from rich.measure import Measurement

    return int(Measurement.get(console, console.options.update_width(1 << 20), table).maximum)


def print_summary(run: Run, console: Any = None, top: int = 0) -> None:
    """Print the run header and the per-layer table (``top``: only the layers that most need a
    look, see :func:`worst_rows`; 0: every layer). Too wide for the console, the table is
    printed as one block per layer."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    meta, prog = run.meta, run.progress
    console.print(
        f"[bold]gradscope[/] {escape(str(run.path))}\n"
        f"status={escape(prog.status_text)}  steps={escape(prog.steps_text)}  "
        f"torch={escape(str(meta.get('torch', '?')))}"
    )
    all_rows = layer_rows(run)
    shown = worst_rows(all_rows, run.findings, top)
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("type", no_wrap=True)
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="right", no_wrap=True)
    for row in shown:
        table.add_row(escape(row["layer"]), escape(row["type"]), *_cells(row))
    if _fits(console, table):
        console.print(table)
    else:
        _stacked_layers(console, shown)
    if len(shown) < len(all_rows):
        console.print(
            f"the {len(shown)} of {len(all_rows)} layers that most need a look "
            "(findings, NaN/Inf, dead or saturated units, extreme gradient norms), "
            "in forward order; --top 0 shows all"
        )
    if all_rows:
        console.print(
            "grad norm, upd ratio (||Δw||/||w||), out grad (backward signal): medians over "
            "steps; nonfinite: gradient elements, summed; dead, sat (saturated): last sampled "
            "step; nan N/M: N of its M values were NaN/Inf; -: not recorded"
        )
    for problem in run.problems:
        console.print(f"[yellow]note:[/] {escape(problem)}")
    findings = run.findings
    if findings:
        console.print(f"\n[bold]{len(findings)} finding(s)[/]")
        print_findings(findings, console)
    else:
        console.print("\nno findings")


def _stacked_layers(console: Any, rows: list[dict[str, Any]]) -> None:
    """The per-layer table as blocks: the layer and its type, then its numbers, wrapped."""
    from rich.padding import Padding
    from rich.text import Text

    for row in rows:
        console.print(Text.assemble((row["layer"], "bold"), f" ({row['type']})", overflow="fold"))
        numbers = "   ".join(f"{title} {cell}" for (_, title, _), cell in zip(COLUMNS, _cells(row)))
        console.print(Padding(Text(numbers, overflow="fold"), (0, 0, 0, 2)))


def layers_text(f: Mapping[str, Any], show: int = 3) -> str:
    """The layers of a finding in a few words: ``net.3``, or ``6 layers: a, b, c, …`` (the
    primary first) for a grouped one."""
    layers = f.get("layers")
    if not isinstance(layers, list) or len(layers) <= 1:
        return str(f.get("layer"))
    names = [str(x) for x in layers]
    more = ", …" if len(names) > show else ""
    return f"{len(names)} layers: {', '.join(names[:show])}{more}"


def _sorted(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(
        findings,
        key=lambda f: (
            order.get(str(f.get("severity")), 3),
            f["first_step"] if isinstance(f.get("first_step"), int) else -1,
        ),
    )


def print_findings(findings: list[dict[str, Any]], console: Any = None) -> None:
    """The findings as a rich table: severity, kind, layer, steps, what and what to try;
    when the console is too narrow for the text column to be readable (``MIN_TEXT``), one
    block per finding instead, wrapped to the console's width."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)
    if not findings:
        return

    def table_of(texts: list[str]) -> Any:
        table = Table(show_edge=False, header_style="bold", pad_edge=False, show_lines=True)
        for title in ("severity", "finding", "layer", "steps"):
            table.add_column(title, no_wrap=True)
        table.add_column("what happened / what to try", overflow="fold")
        for f, text in zip(_sorted(findings), texts):
            color = _color(f)
            table.add_row(
                f"[{color}]{escape(str(f.get('severity')))}[/]",
                escape(str(f.get("kind"))),
                escape(layers_text(f)),
                finding_steps(f),
                text,
            )
        return table

    if _natural_width(console, table_of(["x" * MIN_TEXT] * len(findings))) > console.width:
        _stacked_findings(console, _sorted(findings))
        return
    console.print(
        table_of(
            [
                f"{escape(str(f.get('message', '')))}\n[dim]try:[/] "
                f"{escape(str(f.get('suggestion', '')))}"
                for f in _sorted(findings)
            ]
        )
    )


def _color(f: dict[str, Any]) -> str:
    return {"error": "red", "warning": "yellow"}.get(str(f.get("severity")), "cyan")


def _stacked_findings(console: Any, findings: list[dict[str, Any]]) -> None:
    """One block per finding: severity, kind, layer and steps on one line (wrapped when even
    that is too long), then what happened and what to try, indented and wrapped."""
    from rich.padding import Padding
    from rich.text import Text

    for i, f in enumerate(findings):
        if i:
            console.print()
        console.print(
            Text.assemble(
                (str(f.get("severity")), _color(f)),
                "  ",
                str(f.get("kind")),
                "  layer " if len(f.get("layers") or ()) <= 1 else "  ",
                (layers_text(f), "bold"),
                "  steps ",
                finding_steps(f),
                overflow="fold",
            )
        )
        console.print(Padding(Text(str(f.get("message", "")), overflow="fold"), (0, 0, 0, 2)))
        console.print(
            Padding(
                Text.assemble(("try: ", "dim"), str(f.get("suggestion", "")), overflow="fold"),
                (0, 0, 0, 2),
            )
        )


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

    def announce(self, finding: Mapping[str, Any], new: bool) -> None:
        import time

        if self.quiet:
            return
        now = time.monotonic()
        what = "" if new else " (update)"
        line = (
            f"gradscope: {finding['severity']}{what}: {finding['kind']} at "
            f"{layers_text(finding)}, step {finding['first_step']}: {finding['message']}. "
            f"Try: {finding['suggestion']}"
        )
        self._print(line, now)

    def remedy(self, finding: Mapping[str, Any], action: Mapping[str, Any]) -> None:
        """One line when a finding-time remedy acted (a swap, a recycling), with what follows
        from it, so that a later finding about the new module is no surprise."""
        if self.quiet:
            return
        import time

        kind, layer, step = finding.get("kind"), action.get("layer"), action.get("step")
        if action.get("action") == "swapped":
            line = (
                f"gradscope: swapped {layer} at step {step} ({action.get('from')} -> "
                f"{action.get('to')}) for the {kind} finding; units that stay inactive now "
                "pass a small gradient, so dead units reported there from now on follow "
                "from the swap (info)"
            )
        elif action.get("action") == "recycled":
            line = (
                f"gradscope: re-initialised {action.get('units')} of the {action.get('of')} "
                f"units of {layer} at step {step} for the {kind} finding"
            )
        else:
            return
        self._print(line, time.monotonic())

    def _print(self, line: str, now: float) -> None:
        import sys

        self._times = [t for t in self._times if now - t < self.window]
        if len(self._times) >= self.burst:
            self.suppressed += 1
            return
        self._times.append(now)
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
            print(
                f"gradscope: {len(findings)} finding(s), {errors} error(s){more} in {steps} "
                f"steps, run {status}: {run_dir}",
                file=sys.stderr,
                flush=True,
            )
