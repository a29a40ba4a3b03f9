"""The run directory's own record: Parquet metric chunks, events.jsonl and findings.json.

Crash safety: every flush writes a complete Parquet file under a temporary name and renames it
into place, and every event line is flushed as it is appended, so after a ``kill -9`` everything
up to the last flush is readable and nothing is half-written. A write that fails (a full disk)
raises to the Scope, whose guard stops the recording and says so once; the training goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import rundir
from ..records import LongTable

if TYPE_CHECKING:
    import pyarrow as pa

    from ..events import Finding


def arrow_table(table: LongTable) -> pa.Table:
    """``table`` as the Arrow table of a chunk: step int64; layer, kind and metric
    dictionary-encoded (int32 indices into one entry per column); value float64.

    Built from the arrays' buffers: ``pa.array()`` checks every input for pandas types, which
    imports pandas (~0.15 s of CPU) in a run that never needs it otherwise."""
    import numpy as np
    import pyarrow as pa

    def numbers(values: np.ndarray, dtype: type[np.generic], typ: pa.DataType) -> pa.Array:
        data = np.ascontiguousarray(values, dtype=dtype)
        return pa.Array.from_buffers(typ, len(data), [None, pa.py_buffer(data)])

    def strings(names: list[str]) -> pa.Array:
        encoded = [n.encode("utf-8") for n in names]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        if offsets[-1] > np.iinfo(np.int32).max:  # beyond pa.string()'s offsets
            return pa.array(names, pa.string())
        buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(pa.string(), len(encoded), buffers)

    idx = numbers(table.col, np.int32, pa.int32())
    return pa.table(
        {
            "step": numbers(table.step, np.int64, pa.int64()),
            "layer": pa.DictionaryArray.from_arrays(idx, strings([c[0] for c in table.columns])),
            "kind": pa.DictionaryArray.from_arrays(idx, strings([c[1] for c in table.columns])),
            "metric": pa.DictionaryArray.from_arrays(idx, strings([c[2] for c in table.columns])),
            "value": numbers(table.value, np.float64, pa.float64()),
        }
    )


KEEP_RECORDS = 500_000
"""Records the Store keeps in memory for the report (24 bytes each, about 12 MB): a run that
writes more has its report read from the Parquet chunks instead."""


class Store:
    """Appends metric chunks and events to a run directory.

    Attributes:
        written: Each chunk written, as ``(file name, size in bytes, the records)``, for the
            report at the end of the run (read from memory, not back from disk); None once
            more than ``keep`` records were written.
    """

    def __init__(self, run_dir: Path, keep: int = KEEP_RECORDS) -> None:
        self.run_dir = run_dir
        self.metrics_dir = run_dir / rundir.METRICS
        self._seq = 0
        self._events = open(run_dir / rundir.EVENTS, "a", encoding="utf-8")  # noqa: SIM115
        self.written: list[tuple[str, int, LongTable]] | None = []
        self._keep = keep
        self._kept = 0

    def write(self, table: LongTable) -> None:
        if not len(table):
            return
        import pyarrow.parquet as pq

        arrow = arrow_table(table)
        self._seq += 1
        final = self.metrics_dir / f"part-{self._seq:06d}.parquet"
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            pq.write_table(arrow, tmp, compression="snappy")
            os.replace(tmp, final)
        except BaseException:  # a full disk, a signal: no half-written file stays behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._remember(final, table)

    def _remember(self, final: Path, table: LongTable) -> None:
        """Keep the chunk just written for the report, while under ``keep`` records (the
        arrays are the flush's own; the column list is the buffer's, which grows: copied).
        Never raises: the chunk is on disk, and the report can read it there."""
        if self.written is None:
            return
        try:
            self._kept += len(table)
            if self._kept <= self._keep:
                kept = LongTable(table.step, table.col, table.value, list(table.columns))
                self.written.append((final.name, final.stat().st_size, kept))
                return
        except Exception:
            pass
        self.written = None  # the report reads the chunks

    def event(self, record: dict[str, Any]) -> None:
        self._events.write(json.dumps(record, allow_nan=True, default=str) + "\n")
        self._events.flush()

    def write_findings(self, findings: list[Finding]) -> None:
        rundir.write_json(self.run_dir / rundir.FINDINGS, findings)

    def close(self) -> None:
        self.written = None  # the report has taken them (Outputs.written), or needs none
        if not self._events.closed:
            self._events.close()
