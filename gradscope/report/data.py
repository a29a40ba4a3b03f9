"""What the report draws, read straight from the Parquet chunks and reduced on the way.

A run of 1,000 layers x 100,000 steps holds hundreds of millions of records: far more than a
page can show or pandas should hold at once. So the report never loads the long table. It reads
one chunk at a time (only the metrics it draws), and folds every value into a grid of *step
bins*: at most ``max_cols`` columns, each covering ``width`` consecutive steps. Per (layer, bin)
it keeps the count, the sum, the sum of log10 (for a geometric mean of norms and ratios), the
maximum, and the number of non-finite values, so a NaN at one step of a bin still marks the bin.
Memory is rows x bins per metric, whatever the run's length.

At the end of a run the records come from memory instead, when the store kept them
(``Store.written``: up to ``KEEP_RECORDS``) and they are exactly the chunks in ``metrics/``: the
same arrays, folded the same way, without reading the files back (nor importing pandas, which
pyarrow's ``to_numpy`` loads): most of what a short run's report cost.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..load import (
    MAX_STEP,
    Progress,
    check_run_dir,
    chunk_files,
    layer_order,
    progress,
    read_chunk,
    read_events,
    read_findings,
    read_meta,
    schema_problem,
)
from ..records import LAYER_KINDS, RUN_LAYER

if TYPE_CHECKING:
    from ..load import Run
    from ..records import LongTable

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
    "act_nonfinite": "module",  # marks the dead and saturated fractions of NaN/Inf outputs
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

        def fold(target: np.ndarray, idx: np.ndarray, weights: np.ndarray | None = None) -> None:
            if len(idx):
                target[:n, c0:c1] += np.bincount(idx, weights=weights, minlength=size).reshape(
                    n, span
                )

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
        """log10 of the geometric mean of the positive values: NaN where nothing finite was
        recorded, -inf where every finite value was 0 (a zero is not "not recorded")."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.logsum / self.logcount
        out[(self.count > 0) & (self.logcount == 0)] = -np.inf
        return out[: self.rows()]

    def nonfinite(self) -> np.ndarray:
        """Per row and bin: a NaN/Inf value seen."""
        return self.bad[: self.rows()] > 0

    def nonfinite_count(self) -> np.ndarray:
        """Per row: how many NaN/Inf values over the whole run."""
        return np.asarray(self.bad[: self.rows()].sum(axis=1))

    def peak(self) -> np.ndarray:
        out = self.max[: self.rows()].copy()
        out[~np.isfinite(out)] = np.nan
        return out

    def whole_run(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the mean and the maximum over the whole run (finite values)."""
        n = self.count[: self.rows()].sum(axis=1)
        # huge finite values (a diverging run's) may overflow the sum: an infinite mean, shown
        # as such, not a warning
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
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
    progress: Progress = field(default_factory=lambda: Progress("unknown", "", 0, 0, None))
    _steps: list[np.ndarray] = field(default_factory=list, repr=False)

    def bin_steps(self) -> np.ndarray:
        """The first step of each bin."""
        return np.arange(self.cols) * self.width

    def ordered(self, metric: str) -> tuple[list[str], np.ndarray]:
        """Row names of ``metric`` in forward order (run.json's), and their row indices."""
        acc = self.acc.get(metric)
        if acc is None or not acc.rows():
            return [], np.empty(0, dtype=np.int64)
        order = {name: i for i, name in enumerate(layer_order(self.meta))}
        idx = sorted(
            range(acc.rows()), key=lambda r: (order.get(acc.names[r], len(order)), acc.names[r])
        )
        return [acc.names[i] for i in idx], np.array(idx, dtype=np.int64)

    def site_nonfinite(self, names: list[str]) -> np.ndarray:
        """Per activation site (``names``) and bin: NaN/Inf in the module's output
        (``act_nonfinite`` > 0, or not finite itself). Fractions of such an output (dead,
        saturated) are computed on garbage: a NaN is neither dead nor saturated."""
        out = np.zeros((len(names), self.cols), dtype=bool)
        acc = self.acc.get("act_nonfinite")
        if acc is None:
            return out
        row = {n: i for i, n in enumerate(acc.names)}
        peak, bad = acc.peak(), acc.nonfinite()
        for i, name in enumerate(names):
            r = row.get(name)
            if r is not None:
                with np.errstate(invalid="ignore"):
                    out[i] = (peak[r] > 0) | bad[r]
        return out


def _max_step(files: list[Path]) -> int:
    """The largest valid step in the chunks: from Parquet's column statistics where the
    chunk's schema is valid and its steps in range (no data read), else from its cleaned
    rows (problems are left to the reading pass)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    last = -1
    for f in files:
        top: int | None = None
        try:
            with pq.ParquetFile(f) as pf:
                md = pf.metadata
                if schema_problem(pf.schema_arrow) is None and pa.types.is_integer(
                    pf.schema_arrow.field("step").type
                ):
                    col = md.schema.names.index("step")
                    for g in range(md.num_row_groups):
                        stats = md.row_group(g).column(col).statistics
                        if (
                            stats is None
                            or not stats.has_min_max
                            or stats.null_count
                            or int(stats.min) < 0
                            or int(stats.max) > MAX_STEP
                        ):
                            top = None
                            break
                        top = max(top if top is not None else -1, int(stats.max))
        except Exception:
            top = None
        if top is None:
            table = read_chunk(f, [])
            if table is not None and table.num_rows:
                top = int(max(table.column("step").to_numpy()))
        if top is not None:
            last = max(last, top)
    return last


def read_report_data(
    path: Path,
    max_cols: int = MAX_COLS,
    written: Sequence[tuple[str, int, LongTable]] | None = None,
) -> ReportData:
    """Read and reduce the run directory at ``path`` (validated by :mod:`gradscope.load`:
    what is invalid is dropped and listed in ``problems``).

    Args:
        written: The chunks this process wrote, as the store kept them (``Store.written``):
            when they are exactly the chunks in ``metrics/`` (the same files, of the same
            sizes) and valid, their records are reduced from memory instead of read back from
            disk (the same numbers: the Parquet files hold these arrays). Whatever else the
            report shows (run.json, events, findings) is read from the run directory.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds neither run.json nor metrics/.
    """
    check_run_dir(path)
    problems: list[str] = []
    meta = read_meta(path, problems)
    files = chunk_files(path, problems)
    if not files and not any(p.startswith("metrics") for p in problems):
        problems.append("no metrics recorded (metrics/ is empty)")
    kept = _in_memory(files, written)
    if kept is None:
        last = _max_step(files)
    else:
        last = max((int(t.step.max()) for t in kept if len(t)), default=-1)
    width, cols = _bins(last, max_cols)
    data = ReportData(path, meta, [], [], last, width, cols, problems=problems)
    rows_hint = {
        "param": sum(1 for e in meta.get("layers", []) if e["kind"] == "param"),
        "module": len(meta.get("sites", [])) + len(meta.get("layers", [])),
        "run": 1,
    }
    for metric, kind in DRAWN.items():
        data.acc[metric] = Acc(cols, rows_hint.get(kind, 8))
    wanted = set(DRAWN)
    if kept is not None:
        for t in kept:
            m_codes, m_names = _distinct([c[2] for c in t.columns], t.col)
            l_codes, l_names = _distinct([c[0] for c in t.columns], t.col)
            _fold_arrays(data, m_codes, m_names, l_codes, l_names, t.step, t.value, wanted)
    else:
        _read_chunks(data, files, problems, wanted)
    data.events = read_events(path, problems)
    data.findings = read_findings(path, data.events, problems)
    # the steps as load_run counts them: of the rows that passed the schema
    recorded = np.unique(np.concatenate(data._steps)) if data._steps else np.empty(0, np.int64)
    data._steps = []
    data.progress = progress(meta, path, int(recorded[-1]) if len(recorded) else -1, len(recorded))
    if data.progress.why:
        problems.append(data.progress.why)
    return data


def _bins(last: int, max_cols: int) -> tuple[int, int]:
    """Steps per bin and bins, for steps ``0..last`` in at most ``max_cols`` bins."""
    width = max(1, math.ceil((last + 1) / max_cols)) if last >= 0 else 1
    return width, (last // width + 1) if last >= 0 else 0


def run_report_data(run: Run, metrics: Iterable[str], max_cols: int = MAX_COLS) -> ReportData:
    """The report's reduction of a loaded run's ``metrics`` (``Run.metrics``, folded the way
    :func:`read_report_data` folds the chunks, into the same step bins): what ``Run.plot``
    draws, without reading the run directory again (it may have moved). ``act_nonfinite`` is
    folded too, for the NaN/Inf marks of the activation fractions.

    Raises:
        ValueError: A metric the run did not record, or a run with no records (a one-line
            message naming it and some of the metrics there are).
    """
    metrics = list(metrics)
    df = run.metrics
    have = sorted({str(m) for m in df["metric"].unique()})
    for metric in metrics:
        if metric not in have:
            close = difflib.get_close_matches(metric, have, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
            raise ValueError(
                f"unknown metric {metric!r}{hint}; "
                + (f"this run has {shown}" if have else "this run recorded no metrics")
            )
    steps = df["step"].to_numpy()
    last = int(steps.max()) if len(steps) else -1
    width, cols = _bins(last, max_cols)
    data = ReportData(
        run.path,
        run.meta,
        list(run.findings),
        list(run.events),
        last,
        width,
        cols,
        problems=list(run.problems),
        progress=run.progress,
    )
    wanted = {*metrics, "act_nonfinite"}
    for metric in wanted:
        data.acc[metric] = Acc(cols)
    m_codes, m_names = _factorized(df["metric"])
    l_codes, l_names = _factorized(df["layer"])
    ok = (m_codes >= 0) & (l_codes >= 0)
    values = df["value"].to_numpy(dtype=np.float64)
    _fold_arrays(data, m_codes[ok], m_names, l_codes[ok], l_names, steps[ok], values[ok], wanted)
    data._steps = []
    return data


def _factorized(column: Any) -> tuple[np.ndarray, list[str]]:
    """A string column of a DataFrame as (integer codes, their values): a categorical's own
    codes, else ``pd.factorize``'s (-1: missing)."""
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        codes, uniques = column.cat.codes, column.cat.categories
    else:
        codes, uniques = pd.factorize(column)
    return np.asarray(codes, dtype=np.int64), [str(x) for x in uniques]


def _read_chunks(
    data: ReportData, files: list[Path], problems: list[str], wanted: set[str]
) -> None:
    def read(f: Path) -> tuple[Any, list[str]]:
        found: list[str] = []
        return read_chunk(f, found), found

    # reading (Parquet decoding releases the GIL) overlaps with folding the previous chunk
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        # one chunk read ahead, no more: memory stays at two chunks whatever the run's size
        pending = pool.submit(read, files[0]) if files else None
        for i in range(len(files)):
            assert pending is not None
            table, found = pending.result()
            pending = pool.submit(read, files[i + 1]) if i + 1 < len(files) else None
            problems.extend(found)
            if table is not None:
                _fold(data, table, wanted)


def _in_memory(
    files: list[Path], written: Sequence[tuple[str, int, LongTable]] | None
) -> list[LongTable] | None:
    """The tables of ``written`` when they are what ``files`` hold: the same names in the same
    order, the same sizes, and every row one that reading the file back keeps (a valid step, a
    known kind, names that are strings); None otherwise (then the files are read)."""
    if written is None or [f.name for f in files] != [name for name, _, _ in written]:
        return None
    tables = []
    for f, (_, size, table) in zip(files, written):
        try:
            if f.stat().st_size != size:
                return None
        except OSError:
            return None
        step = np.asarray(table.step)
        if step.dtype.kind not in "iu" or (
            len(step) and (int(step.min()) < 0 or int(step.max()) > MAX_STEP)
        ):
            return None
        col = np.asarray(table.col, dtype=np.int64)
        if len(col) and (int(col.min()) < 0 or int(col.max()) >= len(table.columns)):
            return None
        valid = np.array(
            [
                k in LAYER_KINDS and isinstance(n, str) and isinstance(m, str)
                for n, k, m in table.columns
            ],
            dtype=bool,
        )
        if not valid[col].all():
            return None
        tables.append(table)
    return tables


def _distinct(names: list[str], col: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per-column names (repeated across columns) as each row's code into their distinct
    values, as a Parquet chunk read back holds them."""
    index: dict[str, int] = {}
    remap = np.array([index.setdefault(n, len(index)) for n in names], dtype=np.int64)
    return remap[np.asarray(col, dtype=np.int64)], list(index)


def _codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """A string column as (integer codes, their values), dictionary-encoded or not."""
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    return (
        np.asarray(arr.indices.to_numpy(zero_copy_only=False), dtype=np.int64),
        [str(x) for x in arr.dictionary.to_pylist()],
    )


def _fold(data: ReportData, table: Any, wanted: set[str]) -> None:
    if table.num_rows == 0 or data.cols == 0:
        return
    m_codes, m_names = _codes(table.column("metric"))
    l_codes, l_names = _codes(table.column("layer"))
    steps = table.column("step").to_numpy()
    values = table.column("value").to_numpy()
    _fold_arrays(data, m_codes, m_names, l_codes, l_names, steps, values, wanted)


def _fold_arrays(
    data: ReportData,
    m_codes: np.ndarray,
    m_names: list[str],
    l_codes: np.ndarray,
    l_names: list[str],
    steps: np.ndarray,
    values: np.ndarray,
    wanted: set[str],
) -> None:
    """Fold one chunk's rows (metric and layer as codes into their names) into the grid."""
    if len(steps) == 0 or data.cols == 0:
        return
    data.records += len(steps)
    steps = np.asarray(steps, dtype=np.int64)
    data._steps.append(np.unique(steps))
    values = np.asarray(values, dtype=np.float64)
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


def run_series(
    data: ReportData, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A run-level metric per bin where recorded: (first step, mean of the finite values,
    NaN/Inf seen, max of the finite values). A bin whose values were all NaN/Inf is there,
    with a NaN mean, and marked."""
    acc = data.acc.get(metric)
    if acc is None or RUN_LAYER not in acc.names:
        return None
    r = acc.names.index(RUN_LAYER)
    mean, peak = acc.mean()[r], acc.peak()[r]
    has = (acc.count[r] > 0) | (acc.bad[r] > 0)
    if not has.any():
        return None
    return data.bin_steps()[has], mean[has], acc.nonfinite()[r][has], peak[has]
