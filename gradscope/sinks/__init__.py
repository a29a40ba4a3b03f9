"""Where records go: the Parquet store (+ events and findings) and TensorBoard.

A sink is small and shaped like Lightning's logger: ``write`` a flushed table, ``event`` one
JSON-able record as it happens, ``close`` with the run's final status. Sinks import their heavy
libraries (pyarrow, tensorboard) on first use, so ``import gradscope`` stays light.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..records import LongTable


class Sink(Protocol):
    def write(self, table: LongTable) -> None: ...

    def event(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
