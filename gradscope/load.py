"""Reading a run directory back: the long metrics table, the metadata, events and findings.

This module is the one place that knows what a valid run directory holds (the schema below):
``gradscope summary``, ``gradscope report`` and ``gradscope compare`` read through it, so they
only ever see valid data. A run that crashed or was killed is read as far as it got, and a
damaged one as far as it is readable: every complete Parquet chunk is loaded, temporary files
from an interrupted flush are ignored, a truncated last line of events.jsonl is skipped, and
whatever is invalid (a field of the wrong type, a chunk with the wrong columns, an event line
that is not a JSON object...) is dropped or repaired and listed in ``Run.problems``, one line
each, rather than raised.

The schema:

* ``run.json``: a JSON object; each field in :data:`META_FIELDS` has the type named there (a
  field of another type is dropped), ``layers`` is a list of objects with a string ``name``,
  ``kind`` ``param`` or ``module`` and a string ``type`` (parameters also a string ``module``),
  ``sites`` a list of strings; other fields are kept as they are.
* ``findings.json``: a list of findings; a finding is an object with the fields of
  :data:`FINDING_FIELDS` (a non-string ``kind`` drops it; other bad fields are repaired).
* ``events.jsonl``: one JSON object per line with a string ``event``; ``step``, where
  present, a step number.
* ``metrics/part-*.parquet``: columns :data:`COLUMNS`: ``step`` integers (or integral floats)
  in ``0..MAX_STEP``, ``layer``/``kind``/``metric`` strings, ``kind`` one of ``param``,
  ``module``, ``run``, ``value`` numbers (NaN and Inf are values: a non-finite gradient).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .chunks import chunk_files, clean_chunk, read_chunk, schema_problem
from .runstate import CLOSED, STALE_SECS, Progress, progress
from .schema import (
    COLUMNS,
    FINDING_FIELDS,
    FINDING_OPTIONAL,
    MAX_STEP,
    META_FIELDS,
    PER_FILE,
    SEVERITIES,
    STATUSES,
    _is_int,
    _one_line,
    _Tally,
    _type_name,
    validate_finding,
    validate_meta,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd
    from matplotlib.figure import Figure

# the checks live in schema.py, runstate.py and chunks.py; their names stay importable from here
__all__ = [
    "CLOSED",
    "COLUMNS",
    "FINDING_FIELDS",
    "FINDING_OPTIONAL",
    "MAX_STEP",
    "META_FIELDS",
    "PER_FILE",
    "SEVERITIES",
    "STALE_SECS",
    "STATUSES",
    "Progress",
    "Run",
    "check_run_dir",
    "chunk_files",
    "clean_chunk",
    "finding_steps",
    "findings_from_events",
    "layer_order",
    "load_run",
    "progress",
    "read_chunk",
    "read_events",
    "read_findings",
    "read_meta",
    "schema_problem",
    "validate_finding",
    "validate_meta",
]


@dataclass
class Run:
    """A run directory, read back and validated (see the module's schema).

    Attributes:
        path: The run directory.
        meta: ``run.json`` (status, versions, config, layers in forward order...), its valid
            fields only.
        metrics: Long table with columns step, layer, kind, metric, value.
        events: ``events.jsonl`` records, in order (JSON objects with an ``event`` name).
        findings: ``findings.json`` (after a ``kill -9``: rebuilt from events.jsonl).
        problems: What could not be read or was invalid (a corrupt chunk, a missing file, a
            field of the wrong type; a run that did not close), one line each.
        progress: How far the run got and whether it closed, from what is on disk.
    """

    path: Path
    meta: dict[str, Any]
    metrics: pd.DataFrame
    events: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress("unknown", "", 0, 0, None))

    @property
    def steps(self) -> int:
        """The steps the run got through (from the records when run.json is behind)."""
        return self.progress.steps

    def __repr__(self) -> str:
        return (
            f"<gradscope.Run {self.path.name!r} {self.state}, {self.steps} steps, "
            f"{len(self.findings)} finding(s), {len(self.metrics):,} records>"
        )

    def _repr_html_(self) -> str:
        """What a notebook shows for the run: status, steps, the findings with what to try,
        and the gradient-flow heatmap (:mod:`gradscope.notebook`)."""
        from .notebook import fallback_html, run_html

        try:
            return run_html(self)
        except Exception as exc:
            return fallback_html(repr(self), exc)

    @property
    def closed(self) -> bool:
        """The run ended and recorded how; False while it runs and after a ``kill -9``."""
        return self.progress.closed

    @property
    def state(self) -> str:
        """``completed``, ``failed``, ``interrupted``, ``running``, ``did not close`` or
        ``unknown`` (see :class:`Progress`)."""
        return self.progress.state

    @property
    def layer_order(self) -> list[str]:
        """Layer names in forward order, as recorded in run.json (sites included)."""
        return layer_order(self.meta)

    def wide(self, metric: str, kind: str | None = None) -> pd.DataFrame:
        """One metric as a step x layer table, layers in forward order.

        Args:
            metric: A metric name (``grad_norm``, ``act_dead_fraction``...).
            kind: Restrict to ``param``, ``module`` or ``run`` rows (needed only if a metric
                exists for several kinds).

        Raises:
            KeyError: The run has no such metric (names the ones it has).
        """
        df = self.metrics
        rows = df[df["metric"] == metric]
        if kind is not None:
            rows = rows[rows["kind"] == kind]
        if rows.empty:
            have = sorted(df["metric"].unique().tolist())
            raise KeyError(f"metric {metric!r} not in this run; it has: {', '.join(have)}")
        table = rows.pivot_table(
            index="step", columns="layer", values="value", aggfunc="last", dropna=False
        )
        rank = {name: i for i, name in enumerate(self.layer_order)}
        ordered = sorted(table.columns, key=lambda c: (rank.get(c, len(rank)), c))
        table = table[ordered]
        table.columns.name = metric
        return table

    def plot(
        self, metric: str, layers: str | Sequence[str] | None = None, *, max_lines: int = 8
    ) -> Figure:
        """``metric`` over the steps, one line per layer: the report's chart (the same code
        computes what is drawn, :mod:`gradscope.report.specs`), drawn with matplotlib.

        Values are folded into at most 400 step bins, as in the report: grad_norm and
        update_ratio as the geometric mean of each bin on a log scale, the activation
        fractions held from one sample to the next on 0..1, other metrics as the mean of each
        bin, on a log scale when every value is > 0 and they span more than a decade. A
        run-level metric (``loss``, ``grad_norm_total``...) is one line. Dashed lines: remedy
        actions; magenta ticks: bins with a NaN/Inf value.

        Args:
            metric: Any metric the run recorded (``grad_norm``, ``weight_norm``, ``loss``...).
            layers: Layer names or fnmatch patterns (``"encoder.*"``), drawn in forward order;
                None: as the report picks them (layers with findings, then evenly spaced).
            max_lines: At most this many lines (more matches are thinned as the report does).

        Returns:
            A ``matplotlib.figure.Figure`` made without pyplot (nothing is left open); a
            notebook shows it once.

        Raises:
            ValueError: An unknown metric, or a layer name or pattern that matches nothing
                (one line naming it and some of the accepted ones).
        """
        from .report.mpl import plot

        return plot(self, metric, layers, max_lines=max_lines)

    def heatmap(self, metric: str) -> Figure:
        """A per-layer ``metric`` as layers (forward order, top to bottom) x step bins: the
        report's heatmap, the same pixels (``grad_norm`` is its gradient flow), drawn with
        matplotlib. Scales and folding as :meth:`plot`; sampled metrics are held from one
        sample to the next (grey: not recorded yet; magenta: NaN/Inf).

        Returns:
            A ``matplotlib.figure.Figure`` made without pyplot.

        Raises:
            ValueError: An unknown metric, or a run-level one (no layers to lay out).
        """
        from .report.mpl import heatmap

        return heatmap(self, metric)


def layer_order(meta: dict[str, Any]) -> list[str]:
    """Layer names in forward order from (validated) metadata, activation sites included."""
    order = [e["name"] for e in meta.get("layers", [])]
    seen = set(order)
    for name in meta.get("sites", []):
        if name not in seen:
            order.append(name)
            seen.add(name)
    return order


# -- files --------------------------------------------------------------------------------------
def check_run_dir(path: Path) -> None:
    """Raise unless ``path`` is a directory that holds a run (run.json or metrics/).

    Raises:
        FileNotFoundError: ``path`` is missing, not a directory, unreadable, or holds neither
            run.json nor metrics/ (a one-line message naming it).
    """
    if not path.is_dir():
        what = (
            "no such run directory"
            if not os.path.lexists(path)
            else "not a directory, expected a run directory"
        )
        raise FileNotFoundError(f"{str(path)!r}: {what}")
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise FileNotFoundError(
            f"{str(path)!r}: cannot read the run directory ({exc.strerror or exc})"
        ) from None
    if rundir.RUN_JSON not in names and rundir.METRICS not in names:
        raise FileNotFoundError(
            f"{str(path)!r}: not a gradscope run directory (no run.json, no metrics/)"
        )


def _read(path: Path, problems: list[str]) -> bytes | None:
    """A regular file's bytes; None when missing (no problem) or unreadable (a problem)."""
    name = path.name
    try:
        st = path.stat()
    except FileNotFoundError:
        if os.path.lexists(path):
            problems.append(f"{name}: a broken link: ignored")
        return None
    except OSError as exc:
        problems.append(f"{name} unreadable ({exc.strerror or exc}): ignored")
        return None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        problems.append(f"{name} is {what}: ignored")
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(f"{name} unreadable ({exc.strerror or exc}): ignored")
        return None


def _parse(data: bytes) -> Any:
    """JSON from UTF-8 bytes (NaN and Infinity allowed, as Python writes them).

    Raises:
        ValueError: Not UTF-8, not JSON, or nested too deep (the message says which).
    """
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ValueError("nested too deep") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({_one_line(exc, 80)})") from None


def read_meta(path: Path, problems: list[str]) -> dict[str, Any]:
    """run.json of the run directory ``path``, validated (``{}`` when missing or unusable)."""
    data = _read(path / rundir.RUN_JSON, problems)
    if data is None:
        if not os.path.lexists(path / rundir.RUN_JSON):
            problems.append("run.json missing: no run header, layer order unknown")
        return {}
    try:
        loaded = _parse(data)
    except ValueError as exc:
        problems.append(f"run.json unreadable, {exc}: no run header, layer order unknown")
        return {}
    return validate_meta(loaded, problems)


def read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """events.jsonl of the run directory ``path``: its valid lines (JSON objects with an
    ``event`` name; a ``step`` that is not a step number is dropped from its line)."""
    data = _read(path / rundir.EVENTS, problems)
    if not data:
        return []
    events: list[dict[str, Any]] = []
    tally = _Tally(problems, "events.jsonl", " ")
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ev = _parse(line)
        except ValueError as exc:
            why = "truncated write?" if i == last and str(exc).startswith("not JSON") else str(exc)
            tally.add(f"line {i + 1} unreadable ({why}): skipped")
            continue
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
            what = "no event name" if isinstance(ev, dict) else f"{_type_name(ev)}"
            tally.add(f"line {i + 1} is not an event ({what}): skipped")
            continue
        if "step" in ev and not _is_int(ev["step"]) and ev["step"] is not None:
            tally.add(f"line {i + 1}: step is {_type_name(ev['step'])}, expected a step: ignored")
            ev = {k: v for k, v in ev.items() if k != "step"}
        events.append(ev)
    tally.close()
    return events


def read_findings(
    path: Path, events: list[dict[str, Any]], problems: list[str]
) -> list[dict[str, Any]]:
    """findings.json of the run directory ``path``, validated; when it is missing or
    unusable, the findings as events.jsonl last told them."""
    file = path / rundir.FINDINGS
    data = _read(file, problems)
    if data is not None:
        try:
            loaded = _parse(data)
        except ValueError as exc:
            problems.append(f"findings.json unreadable, {exc}: findings rebuilt from events.jsonl")
            return findings_from_events(events, problems)
        if isinstance(loaded, list):
            tally = _Tally(problems, "findings.json")
            out = [
                f
                for i, item in enumerate(loaded)
                if (f := validate_finding(item, f"finding {i}", tally)) is not None
            ]
            tally.close()
            return out
        problems.append(
            f"findings.json is {_type_name(loaded)}, not a list: findings rebuilt from events.jsonl"
        )
        return findings_from_events(events, problems)
    found = findings_from_events(events, problems)
    if found and not os.path.lexists(file):
        problems.append(
            "findings.json missing (the run was killed?): findings rebuilt from "
            "events.jsonl, as they were when raised"
        )
    return found


def finding_steps(f: dict[str, Any]) -> str:
    """A finding's steps as the summary and the report show them: ``12`` or ``12-40`` (``?``
    for a step it does not know)."""
    first, last = f.get("first_step"), f.get("last_step")
    a, b = ("?" if first is None else str(first)), ("?" if last is None else str(last))
    return a if a == b else f"{a}-{b}"


def findings_from_events(
    events: list[dict[str, Any]], problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """The findings as ``events.jsonl`` last told them (``finding`` when raised,
    ``finding_updated`` when the tracer named a module): what survives a ``kill -9``."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    tally = _Tally(problems if problems is not None else [], "events.jsonl")
    for i, event in enumerate(events):
        if event.get("event") not in ("finding", "finding_updated"):
            continue
        finding = validate_finding(
            {k: v for k, v in event.items() if k != "event"}, f"finding event {i + 1}", tally
        )
        if finding is None:
            continue
        kind = finding["kind"]
        key = (kind,) if kind == "nonfinite" else (kind, finding["layer"], finding["first_step"])
        latest[key] = finding
    tally.close()
    return list(latest.values())


def _empty_metrics() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "layer": pd.Series(dtype=str),
            "kind": pd.Series(dtype=str),
            "metric": pd.Series(dtype=str),
            "value": pd.Series(dtype="float64"),
        }
    )


def load_run(path: str | Path) -> Run:
    """Read the run directory at ``path``; what is invalid or unreadable is listed in
    ``Run.problems`` (see the module's schema), never raised.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a gradscope run directory.
    """
    import pandas as pd

    run_path = Path(path)
    check_run_dir(run_path)
    problems: list[str] = []
    meta = read_meta(run_path, problems)
    frames = []
    for chunk in chunk_files(run_path, problems):
        table = read_chunk(chunk, problems)
        if table is not None and table.num_rows:
            frames.append(table.to_pandas())
    if frames:
        metrics = pd.concat(frames, ignore_index=True)
        for col in ("layer", "kind", "metric"):
            metrics[col] = metrics[col].astype(str)
        last, recorded = int(metrics["step"].max()), int(metrics["step"].nunique())
    else:
        metrics, last, recorded = _empty_metrics(), -1, 0
    events = read_events(run_path, problems)
    findings = read_findings(run_path, events, problems)
    prog = progress(meta, run_path, last, recorded)
    if prog.why:
        problems.append(prog.why)
    return Run(run_path, meta, metrics, events, findings, problems, prog)
