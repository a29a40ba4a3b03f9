"""Reading a run directory back: the long metrics table, the metadata, events and findings.

A run that crashed or was killed is read as far as it got: every complete Parquet chunk is
loaded, temporary files from an interrupted flush are ignored, a truncated last line of
events.jsonl is skipped, and what could not be read is listed in ``Run.problems`` rather than
raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("step", "layer", "kind", "metric", "value")


@dataclass
class Run:
    """A run directory, read back.

    Attributes:
        path: The run directory.
        meta: ``run.json`` (status, versions, config, layers in forward order...).
        metrics: Long table with columns step, layer, kind, metric, value (``meta`` is also in
            ``metrics.attrs["run"]``).
        events: ``events.jsonl`` records, in order.
        findings: ``findings.json`` (empty until the run ended).
        problems: What could not be read (a corrupt chunk, a missing file), one line each.
    """

    path: Path
    meta: dict[str, Any]
    metrics: pd.DataFrame
    events: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def layer_order(self) -> list[str]:
        """Layer names in forward order, as recorded in run.json (sites included)."""
        order: list[str] = []
        for entry in self.meta.get("layers", []):
            order.append(entry["name"])
        for name in self.meta.get("sites", []):
            if name not in order:
                order.append(name)
        return order

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
        table = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="last",
                                 dropna=False)
        rank = {name: i for i, name in enumerate(self.layer_order)}
        ordered = sorted(table.columns, key=lambda c: (rank.get(c, len(rank)), c))
        table = table[ordered]
        table.columns.name = metric
        return table


def load_run(path: str | Path) -> Run:
    """Read the run directory at ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a gradscope run directory.
    """
    import pandas as pd

    run_path = Path(path)
    if not run_path.is_dir():
        raise FileNotFoundError(f"{str(run_path)!r}: no such run directory")
    problems: list[str] = []
    meta: dict[str, Any] = {}
    meta_file = run_path / rundir.RUN_JSON
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"run.json unreadable: {exc}")
    elif not (run_path / rundir.METRICS).is_dir():
        raise FileNotFoundError(
            f"{str(run_path)!r}: not a gradscope run directory (no run.json, no metrics/)"
        )
    else:
        problems.append("run.json missing")

    frames = []
    for chunk in sorted((run_path / rundir.METRICS).glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(chunk))
        except Exception as exc:
            problems.append(f"{chunk.name} unreadable: {exc}")
    if frames:
        metrics = pd.concat(frames, ignore_index=True)
        for col in ("layer", "kind", "metric"):
            metrics[col] = metrics[col].astype(str)
    else:
        metrics = pd.DataFrame({c: pd.Series(dtype="float64" if c == "value" else "object")
                                for c in COLUMNS})
        metrics["step"] = metrics["step"].astype("int64")
    metrics.attrs["run"] = meta

    events: list[dict[str, Any]] = []
    events_file = run_path / rundir.EVENTS
    if events_file.exists():
        lines = events_file.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                problems.append(f"events.jsonl line {i + 1} unreadable (truncated write?)")

    findings: list[dict[str, Any]] = []
    findings_file = run_path / rundir.FINDINGS
    if findings_file.exists():
        try:
            findings = json.loads(findings_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"findings.json unreadable: {exc}")
            findings = findings_from_events(events)
    else:
        findings = findings_from_events(events)
        if findings:
            problems.append(
                "findings.json missing (the run was killed?): findings rebuilt from "
                "events.jsonl, as they were when raised"
            )
    return Run(run_path, meta, metrics, events, findings, problems)


def findings_from_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The findings as ``events.jsonl`` last told them (``finding`` when raised,
    ``finding_updated`` when the tracer named a module): what survives a ``kill -9``."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for event in events:
        if event.get("event") not in ("finding", "finding_updated"):
            continue
        finding = {k: v for k, v in event.items() if k != "event"}
        kind = finding.get("kind")
        key = (kind,) if kind == "nonfinite" else (kind, finding.get("layer"),
                                                  finding.get("first_step"))
        latest[key] = finding
    return list(latest.values())
