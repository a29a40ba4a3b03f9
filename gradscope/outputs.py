"""The run's sinks, each behind the guard: the run directory's store and TensorBoard.

A sink (:class:`gradscope.sinks.Sink`) writes flushed tables, takes events, and closes. Each
call goes through the Scope's guard as the sink's own entry point (``sink:store``,
``sink:tensorboard``): a sink that fails (a full disk, a bug) stops, the others go on, and the
training never hears of it. The store failing stops the recording (see
:mod:`gradscope.guard`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .events import Finding
from .guard import ENTRY_POINTS, Guard
from .imports import own_imports
from .records import LongTable
from .sinks import RunStore, Sink

if TYPE_CHECKING:
    from .config import Config
    from .ranks import RankCoordinator


class Outputs:
    """The sinks of one run.

    Args:
        guard: The Scope's guard.
        run_dir: The run directory.
        store: The run directory's own record (a rank other than 0: an outbox to rank 0).
        writer: Whether this process writes the run directory (rank 0, or the only one).
    """

    def __init__(self, guard: Guard, run_dir: Path, store: RunStore, writer: bool) -> None:
        self._guard = guard
        self.run_dir = run_dir
        self.writer = writer
        self.store = store
        self.tensorboard: Sink | None = None  # reads the raw histogram columns too
        self.sinks: list[Sink] = [store]
        self._entry: dict[int, str] = {id(store): "sink:store"}
        self.histograms = False  # TensorBoard gets the raw gradient histograms

    @classmethod
    def create(
        cls, guard: Guard, run_dir: Path, config: Config, ranks: RankCoordinator | None
    ) -> Outputs:
        """The sinks ``config`` asks for: the store (on a rank other than 0, the outbox to
        rank 0) and, where this process writes, TensorBoard."""
        from .ranks import RankOutbox
        from .sinks.store import KEEP_RECORDS, Store

        writer = ranks is None or ranks.writer
        # the store keeps what it writes in memory for the report (none when there is none)
        store: RunStore = (
            Store(run_dir, keep=KEEP_RECORDS if config.report else 0)
            if ranks is None or ranks.writer
            else RankOutbox(ranks.dist)
        )
        out = cls(guard, run_dir, store, writer)
        # a shard's histogram is not a part of the whole one: none under FSDP
        out.histograms = (
            config.tensorboard and config.histograms and not (ranks is not None and ranks.sharded)
        )
        if config.tensorboard and writer:
            with own_imports():
                from .sinks.tensorboard import TensorBoardSink

            out.add_tensorboard(
                TensorBoardSink(run_dir / rundir.TB, config.tb_max_layers, raw=out.histograms)
            )
        return out

    def add_tensorboard(self, sink: Sink) -> None:
        self.tensorboard = sink
        self.sinks.append(sink)
        self._entry[id(sink)] = "sink:tensorboard"

    def live(self, sink: Sink) -> bool:
        """Whether ``sink`` still writes."""
        return self._guard.active(ENTRY_POINTS[self._entry.get(id(sink), "sink:store")])

    def call(self, sink: Sink, method: str, *args: Any) -> bool:
        """``sink.method(*args)`` under the guard; True when it ran to the end."""
        entry = self._entry.get(id(sink), "sink:store")
        if not self._guard.active(ENTRY_POINTS[entry]):
            return False
        ran = [False]

        def call() -> None:
            getattr(sink, method)(*args)
            ran[0] = True

        self._guard.call(entry, call)
        return ran[0]

    def write(self, sink: Sink, table: LongTable) -> bool:
        return self.call(sink, "write", table)

    def event(self, record: dict[str, Any]) -> None:
        """An event for every sink that keeps events (events.jsonl, TensorBoard text)."""
        for sink in self.sinks:
            self.call(sink, "event", record)

    def record(self, record: dict[str, Any]) -> None:
        """An event for the store only (events.jsonl)."""
        self.call(self.store, "event", record)

    def record_late(self, record: dict[str, Any]) -> None:
        """An event that must reach events.jsonl even after the store closed (an internal
        error in the report, the last stage); never raises."""
        if not self.live(self.store):
            return
        try:
            self.store.event(record)
        except Exception:
            if self.writer:
                with contextlib.suppress(Exception):
                    rundir.append_event(self.run_dir, record)

    def written(self) -> list[tuple[str, int, LongTable]] | None:
        """The chunks the store kept in memory for the report (``Store.written``); None
        where it kept none (a rank's outbox, too many records, a store closed). Never
        raises: without them, the report reads the chunks."""
        try:
            kept = getattr(self.store, "written", None)
            return list(kept) if kept is not None else None
        except Exception:
            return None

    def write_findings(self, findings: list[Finding]) -> None:
        self.call(self.store, "write_findings", findings)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """run.json, through the store's guard."""
        if self.writer:
            self._guard.call("sink:store", rundir.write_json, self.run_dir / rundir.RUN_JSON, meta)

    def close(self) -> None:
        """Close every sink, also one that failed before (to release its file)."""
        for sink in self.sinks:
            if self.live(sink):
                self.call(sink, "close")
            else:
                with contextlib.suppress(Exception):
                    sink.close()
