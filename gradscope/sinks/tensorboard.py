"""TensorBoard scalars in ``tb/``: tags ``<metric>/<layer>`` and run-level ``<metric>``.

One event per step carries all of that step's values (one Summary with many values), which is
an order of magnitude cheaper than one ``add_scalar`` call per value and reads back the same
through TensorBoard's EventAccumulator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..records import RUN_LAYER, LongTable


def tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a record: ``grad_norm/fc1.weight``; run level: ``loss``."""
    return metric if layer == RUN_LAYER else f"{metric}/{layer}"


class TensorBoardSink:
    """Writes flushed records as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        self._tags: list[str] = []

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=3600)
        return self._writer

    def write(self, table: LongTable) -> None:
        if not len(table):
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        writer = self._open()
        while len(self._tags) < len(table.columns):
            layer, _, metric = table.columns[len(self._tags)]
            self._tags.append(tag(layer, metric))
        steps = table.step.tolist()
        cols = table.col.tolist()
        values = table.value.tolist()
        start = 0
        for i in range(1, len(steps) + 1):  # records are grouped by step
            if i == len(steps) or steps[i] != steps[start]:
                summary = Summary(
                    value=[
                        Summary.Value(tag=self._tags[c], simple_value=v)
                        for c, v in zip(cols[start:i], values[start:i])
                    ]
                )
                writer.file_writer.add_summary(summary, global_step=steps[start])
                start = i
        writer.flush()

    def event(self, record: dict[str, Any]) -> None:
        return None  # findings and remedy events are text; the diagnosis issue adds them

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
