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
    from ..events import Finding


class Store:
    """Appends metric chunks and events to a run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_dir = run_dir / rundir.METRICS
        self._seq = 0
        self._events = open(run_dir / rundir.EVENTS, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, table: LongTable) -> None:
        if not len(table):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        layers = pa.array([c[0] for c in table.columns], pa.string())
        kinds = pa.array([c[1] for c in table.columns], pa.string())
        metrics = pa.array([c[2] for c in table.columns], pa.string())
        idx = pa.array(table.col, pa.int32())
        arrow = pa.table(
            {
                "step": pa.array(table.step, pa.int64()),
                "layer": pa.DictionaryArray.from_arrays(idx, layers),
                "kind": pa.DictionaryArray.from_arrays(idx, kinds),
                "metric": pa.DictionaryArray.from_arrays(idx, metrics),
                "value": pa.array(table.value, pa.float64()),
            }
        )
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

    def event(self, record: dict[str, Any]) -> None:
        self._events.write(json.dumps(record, allow_nan=True, default=str) + "\n")
        self._events.flush()

    def write_findings(self, findings: list[Finding]) -> None:
        rundir.write_json(self.run_dir / rundir.FINDINGS, findings)

    def close(self) -> None:
        if not self._events.closed:
            self._events.close()
