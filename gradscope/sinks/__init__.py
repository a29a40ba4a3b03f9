"""Where records go: the Parquet store (+ events and findings) and TensorBoard.

A sink is small and shaped like Lightning's logger: ``write`` a flushed table, ``event`` one
JSON-able record as it happens, ``close`` with the run's final status. Sinks import their heavy
libraries (pyarrow, tensorboard) on first use, so ``import gradscope`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..records import LongTable

if TYPE_CHECKING:
    from ..events import Finding


class Sink(Protocol):
    """Where flushed records and events go (the store, TensorBoard)."""

    def write(self, table: LongTable) -> None:
        """One flush's records (a long table: step, column, value)."""

    def event(self, record: dict[str, Any]) -> None:
        """One event (:class:`gradscope.events.Event`), as it happens."""

    def close(self) -> None:
        """The run ended: write what is buffered and release files."""


class RunStore(Sink, Protocol):
    """The run's own record (``metrics/``, ``events.jsonl``, ``findings.json``): the Parquet
    :class:`~gradscope.sinks.store.Store`, or on a rank other than 0 the outbox that sends
    everything to rank 0 (:class:`gradscope.ranks.RankOutbox`)."""

    def write_findings(self, findings: list[Finding]) -> None:
        """The findings at the end of the run (``findings.json``)."""
