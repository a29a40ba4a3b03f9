"""What the report draws, read straight from the Parquet chunks and reduced on the way.

A run of 1,000 layers x 100,000 steps holds hundreds of millions of records: far more than a
page can show or pandas should hold at once. So the report never loads the long table. It reads
one chunk at a time (only the metrics it draws), and folds every value into a grid of *step
bins*: at most ``max_cols`` columns, each covering ``width`` consecutive steps. Per (layer, bin)
it keeps the count, the sum, the sum of log10 (for a geometric mean of norms and ratios), the
maximum, and the number of non-finite values, so a NaN at one step of a bin still marks the bin.
Memory is rows x bins per metric, whatever the run's length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import rundir
from ..records import RUN_LAYER

MAX_COLS = 400  # step bins: columns of a heatmap, points of a line

# metric -> kind of row it is drawn for
DRAWN = {
    "grad_norm": "param",
    "update_ratio": "param",
    "act_dead_fraction": "module",
    "act_saturation": "module",
    "output_grad_norm": "module",
    "loss": "run",
    "grad_norm_total": "run",
    "grad_norm_total_clipped": "run",
    "skipped_step": "run",
}


class Acc:
    """Per (row, step bin) count, sum, sum of log10 (positive values), max and non-finite
    count, growing as rows appear."""

    def __init__(self, cols: int, rows: int = 8) -> None:
        self.cols = cols
        self.names: list[str] = []
        self._row: dict[str, int] = {}
        shape = (max(rows, 1), cols)
        self.count = np.zeros(shape)
        self.sum = np.zeros(shape)
        self.logsum = np.zeros(shape)
        self.logcount = np.zeros(shape)
        self.max = np.full(shape, -np.inf)
        self.bad = np.zeros(shape)

    def rows_for(self, names: list[str]) -> np.ndarray:
        """Row indices of ``names`` (new names get new rows, in the order first seen)."""
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            r = self._row.get(name)
            if r is None:
                r = self._row[name] = len(self.names)
                self.names.append(name)
            out[i] = r
        if len(self.names) > self.count.shape[0]:
            self._grow(max(len(self.names), 2 * self.count.shape[0]))
        return out

    def _grow(self, rows: int) -> None:
        def pad(a: np.ndarray, fill: float) -> np.ndarray:
            extra = np.full((rows - a.shape[0], a.shape[1]), fill)
            return np.vstack([a, extra])

        self.count, self.sum = pad(self.count, 0.0), pad(self.sum, 0.0)
        self.logsum, self.logcount = pad(self.logsum, 0.0), pad(self.logcount, 0.0)
        self.max, self.bad = pad(self.max, -np.inf), pad(self.bad, 0.0)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """Fold values in. A chunk covers a few consecutive bins: the counting runs over that
        slice of the grid only."""
        if not len(values):
            return
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        span = c1 - c0
        n = self.rows()
        size = n * span
        flat = rows * span + (cols - c0)
        finite = np.isfinite(values)
        f, v = flat[finite], values[finite]
        pos = v > 0

        def fold(target: np.ndarray, idx: np.ndarray, weights: np.ndarray | None = None
                 ) -> None:
            if len(idx):
                target[:n, c0:c1] += np.bincount(idx, weights=weights, minlength=size
                                                 ).reshape(n, span)

        fold(self.bad, flat[~finite])
        fold(self.count, f)
        fold(self.sum, f, v)
        fold(self.logsum, f[pos], np.log10(v[pos]))
        fold(self.logcount, f[pos])
        if len(f):
            peak = np.full(size, -np.inf)
            np.maximum.at(peak, f, v)
            np.maximum(self.max[:n, c0:c1], peak.reshape(n, span), out=self.max[:n, c0:c1])

    def rows(self) -> int:
        return len(self.names)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sum / self.count
        return out[: self.rows()]

    def log_mean(self) -> np.ndarray:
        """log10 of the geometric mean of the positive values (NaN where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.logsum / self.logcount
        return out[: self.rows()]

    def nonfinite(self) -> np.ndarray:
        return self.bad[: self.rows()] > 0

    def peak(self) -> np.ndarray:
        out = self.max[: self.rows()].copy()
        out[~np.isfinite(out)] = np.nan
        return out

    def whole_run(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the mean and the maximum over the whole run (finite values)."""
        n = self.count[: self.rows()].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum[: self.rows()].sum(axis=1) / n
        peak = self.max[: self.rows()].max(axis=1) if self.cols else np.full(self.rows(), np.nan)
        peak = np.where(np.isfinite(peak), peak, np.nan)
        return mean, peak


@dataclass
class ReportData:
    """Everything the report shows, reduced."""

    path: Path
    meta: dict[str, Any]
    findings: list[dict[str, Any]]
    events: list[dict[str, Any]]
    last_step: int  # the largest step recorded (-1: none)
    width: int  # steps per bin
    cols: int
    acc: dict[str, Acc] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    records: int = 0

    def bin_steps(self) -> np.ndarray:
        """The first step of each bin."""
        return np.arange(self.cols) * self.width

    def ordered(self, metric: str) -> tuple[list[str], np.ndarray]:
        """Row names of ``metric`` in forward order (run.json's), and their row indices."""
        acc = self.acc.get(metric)
        if acc is None or not acc.rows():
            return [], np.empty(0, dtype=np.int64)
        order = {name: i for i, name in enumerate(_layer_order(self.meta))}
        idx = sorted(range(acc.rows()), key=lambda r: (order.get(acc.names[r], len(order)),
                                                        acc.names[r]))
        return [acc.names[i] for i in idx], np.array(idx, dtype=np.int64)


def _layer_order(meta: dict[str, Any]) -> list[str]:
    order = [e["name"] for e in meta.get("layers", []) if isinstance(e, dict) and "name" in e]
    order += [s for s in meta.get("sites", []) if isinstance(s, str) and s not in order]
    return order


def _max_step(files: list[Path], problems: list[str]) -> int:
    """The largest step in the chunks, from Parquet's column statistics (no data read)."""
    import pyarrow.parquet as pq

    last = -1
    for f in files:
        try:
            md = pq.ParquetFile(f).metadata
            col = md.schema.names.index("step")
            for g in range(md.num_row_groups):
                stats = md.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max:
                    last = max(last, int(stats.max))
        except Exception:
            continue
    return last


def read_report_data(path: Path, max_cols: int = MAX_COLS) -> ReportData:
    """Read and reduce the run directory at ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds neither run.json nor metrics/.
    """
    import pyarrow.parquet as pq

    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r}: no such run directory")
    problems: list[str] = []
    meta: dict[str, Any] = {}
    meta_file = path / rundir.RUN_JSON
    if meta_file.is_file():
        try:
            loaded = json.loads(meta_file.read_text(encoding="utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                problems.append("run.json is not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"run.json unreadable ({exc}): no run header, layer order unknown")
    elif not (path / rundir.METRICS).is_dir():
        raise FileNotFoundError(
            f"{str(path)!r}: not a gradscope run directory (no run.json, no metrics/)")
    else:
        problems.append("run.json missing: no run header, layer order unknown")

    events = _read_events(path / rundir.EVENTS, problems)
    findings = _read_findings(path / rundir.FINDINGS, events, problems)

    files = sorted((path / rundir.METRICS).glob("part-*.parquet"))
    if not files:
        problems.append("no metrics recorded (metrics/ is empty or missing)")
    last = _max_step(files, problems)
    width = max(1, math.ceil((last + 1) / max_cols)) if last >= 0 else 1
    cols = (last // width + 1) if last >= 0 else 0
    data = ReportData(path, meta, findings, events, last, width, cols, problems=problems)
    rows_hint = {"param": sum(1 for e in meta.get("layers", [])
                              if isinstance(e, dict) and e.get("kind") == "param"),
                 "module": len(meta.get("sites", []) or []) + len(meta.get("layers", [])),
                 "run": 1}
    for metric, kind in DRAWN.items():
        data.acc[metric] = Acc(cols, rows_hint.get(kind, 8))
    wanted = set(DRAWN)

    def read(f: Path) -> Any:
        try:
            return pq.read_table(f, columns=["step", "layer", "metric", "value"])
        except Exception as exc:
            return exc

    # reading (Parquet decoding releases the GIL) overlaps with folding the previous chunk
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        # one chunk read ahead, no more: memory stays at two chunks whatever the run's size
        pending = pool.submit(read, files[0]) if files else None
        for i, f in enumerate(files):
            assert pending is not None
            table = pending.result()
            pending = pool.submit(read, files[i + 1]) if i + 1 < len(files) else None
            if isinstance(table, Exception):
                problems.append(f"{f.name} unreadable ({type(table).__name__}): its steps are "
                                "missing")
                continue
            _fold(data, table, wanted)
    return data


def _codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """A string column as (integer codes, their values), dictionary-encoded or not."""
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    return (np.asarray(arr.indices.to_numpy(zero_copy_only=False), dtype=np.int64),
            [str(x) for x in arr.dictionary.to_pylist()])


def _fold(data: ReportData, table: Any, wanted: set[str]) -> None:
    if table.num_rows == 0 or data.cols == 0:
        return
    data.records += table.num_rows
    m_codes, m_names = _codes(table.column("metric"))
    l_codes, l_names = _codes(table.column("layer"))
    steps = np.asarray(table.column("step").to_numpy(), dtype=np.int64)
    values = np.asarray(table.column("value").to_numpy(), dtype=np.float64)
    cols = np.minimum(steps // data.width, data.cols - 1)
    for code, metric in enumerate(m_names):
        if metric not in wanted:
            continue
        sel = m_codes == code
        if not sel.any():
            continue
        acc = data.acc[metric]
        lc = l_codes[sel]
        present = np.flatnonzero(np.bincount(lc, minlength=len(l_names)))
        row_of = np.zeros(len(l_names), dtype=np.int64)
        row_of[present] = acc.rows_for([l_names[i] for i in present])
        acc.add(row_of[lc], cols[sel], values[sel])


def _read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if not path.is_file():
        return events
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        problems.append(f"events.jsonl unreadable ({exc})")
        return events
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            problems.append(f"events.jsonl line {i + 1} unreadable (a truncated write?)")
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def _read_findings(path: Path, events: list[dict[str, Any]],
                   problems: list[str]) -> list[dict[str, Any]]:
    from ..load import findings_from_events

    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, list):
                return [f for f in loaded if isinstance(f, dict)]
            problems.append("findings.json is not a list")
        except (OSError, ValueError) as exc:
            problems.append(f"findings.json unreadable ({exc}): findings from events.jsonl")
    found = findings_from_events(events)
    if found and not path.is_file():
        problems.append("findings.json missing (the run did not end?): findings from "
                        "events.jsonl, as they were when raised")
    return found


def run_series(data: ReportData, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray] | None:
    """A run-level metric per bin: (first step, mean, min-ish, max) where recorded."""
    acc = data.acc.get(metric)
    if acc is None or RUN_LAYER not in acc.names:
        return None
    r = acc.names.index(RUN_LAYER)
    mean, peak = acc.mean()[r], acc.peak()[r]
    has = acc.count[r] > 0
    if not has.any():
        return None
    return data.bin_steps()[has], mean[has], acc.nonfinite()[r][has], peak[has]
