"""A run's metadata: its status, run.json's content, and the end-of-run report.

run.json is a status file beside the records (the records themselves are in ``metrics/``): what
ran (versions, command, configuration, models, layers in forward order), where, and how it
ended. The run-directory contract is documented in ``docs/run-directory.md``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, rundir
from .events import Event

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn

    from .clock import Clock
    from .config import Config
    from .layers import LayerTable
    from .ranks import RankCoordinator
    from .records import LongTable


class RunStatus(str, Enum):
    """How a run stands: ``running`` until it closes, then how it ended."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


ENDED = tuple(s.value for s in RunStatus if s is not RunStatus.RUNNING)
"""The statuses ``Scope.close(status=...)`` accepts."""


def status_for(exc: BaseException | None) -> RunStatus:
    """The status of a run that ended with ``exc`` (None: it returned). ``sys.exit(0)`` (or
    ``sys.exit()``) is a completed run, any other exit code a failed one, as ``python`` reports
    it; Ctrl-C interrupts."""
    if exc is None:
        return RunStatus.COMPLETED
    if isinstance(exc, KeyboardInterrupt):
        return RunStatus.INTERRUPTED
    if isinstance(exc, SystemExit):
        return RunStatus.COMPLETED if exc.code in (None, 0) else RunStatus.FAILED
    return RunStatus.FAILED


def run_meta(
    config: Config,
    status: str,
    *,
    command: list[str],
    cwd: str,
    pid: int,
    started: float,
    exit_code: int | None,
    models: dict[str, str],
    steps: int,
    step_mode: str | None,
    layers: list[dict[str, Any]],
    sites: list[str],
    **extra: Any,
) -> dict[str, Any]:
    """run.json's content (``docs/run-directory.md``)."""
    import torch

    return {
        "gradscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(command),
        "argv": list(sys.argv),
        "cwd": cwd,
        "pid": pid,
        "host": socket.gethostname(),  # with pid: whether a "running" run is still alive
        "config": config.to_json(),
        "models": models,
        "started": _iso(started),
        "ended": None if status == RunStatus.RUNNING else _iso(time.time()),
        "status": str(status),
        "exit_code": exit_code,
        "world_size": _world_size(),
        "steps": steps,
        "step_mode": step_mode,
        "layers": layers,
        "sites": sites,
        **extra,
    }


META_SECS = 10.0
"""At most this long between two rewrites of run.json while the run goes on."""


class RunJson:
    """run.json of one run: written at the start, rewritten while the run goes on (after a
    flush, when the layer list grew or every :data:`META_SECS`, not at every flush: it is a
    status file, the loader counts steps from the records) and at the end.

    Args:
        config: The run's configuration.
        launch: ``(command, cwd)`` when not ``python`` in the working directory now.
        writer: Whether this process writes the run directory.
        write: Writes the content through the store's guard.
        models, table, ranks: The Scope's (what run.json describes).

    :meth:`follow` gives it the clock and the activation sites once they exist.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        launch: tuple[list[str], str] | None,
        writer: bool,
        write: Callable[[dict[str, Any]], None],
        models: Mapping[str, nn.Module],
        table: LayerTable,
        ranks: RankCoordinator | None,
    ) -> None:
        self.path = run_dir / rundir.RUN_JSON
        self.config = config
        self.command, self.cwd = launch or ([Path(sys.executable).name, *sys.argv], os.getcwd())
        self.writer = writer
        self._write = write
        self.models = models
        self.table = table
        self.ranks = ranks
        self.clock: Clock | None = None
        self.sites: Callable[[], list[str]] = list
        self.pid = os.getpid()
        self.started = time.time()
        self.exit_code: int | None = None
        self._time = 0.0
        self._shape: tuple[int, int] | None = None

    def follow(self, clock: Clock, sites: Callable[[], list[str]]) -> None:
        self.clock = clock
        self.sites = sites

    def shape(self) -> tuple[int, int]:
        """Modules seen running and activation sites: what run.json's layer lists hold (a
        rewrite when they grew)."""
        return self.table.executed_count(), len(self.sites())

    def fields(self) -> dict[str, Any]:
        """What run.json says that changes as the run goes on."""
        from .naming import model_label

        ranks, clock = self.ranks, self.clock
        return {
            "models": {k: model_label(m) for k, m in self.models.items()},
            "steps": clock.step if clock is not None else 0,
            "step_mode": clock.mode if clock is not None else None,
            "layers": self.table.describe(),
            "sites": self.sites(),
            **(
                {"distributed": ranks.meta(), "world_size": ranks.dist.size}
                if ranks is not None
                else {}
            ),
        }

    def due(self) -> None:
        """After a flush: rewrite when the layer lists grew or every META_SECS."""
        if self.shape() != self._shape or time.monotonic() - self._time >= META_SECS:
            self.write(RunStatus.RUNNING)

    def write(self, status: RunStatus, strict: bool = False) -> None:
        """Rewrite run.json (``strict``: raise an OSError, as ``watch()`` does; otherwise
        through the store's guard)."""
        self._time = time.monotonic()
        self._shape = self.shape()
        if not self.writer:
            return
        meta = run_meta(
            self.config,
            status,
            command=self.command,
            cwd=self.cwd,
            pid=self.pid,
            started=self.started,
            exit_code=None if status == RunStatus.RUNNING else self.exit_code,
            **self.fields(),
        )
        if strict:
            rundir.write_json(self.path, meta)
        else:
            self._write(meta)


def write_report_safely(
    run_dir: Path, quiet: bool, written: Sequence[tuple[str, int, LongTable]] | None = None
) -> None:
    """report.html, from what was just written (the metrics from ``written``, the chunks the
    store kept in memory, when they are what metrics/ holds); a failure costs the report, not
    the run (an ``internal_error`` event, and ``gradscope report RUN`` can write it again)."""
    try:
        from .report import write_report

        write_report(run_dir, written=written)
    except Exception as exc:
        with contextlib.suppress(Exception):
            rundir.append_event(run_dir, Event.internal_error("report", exc))
        if not quiet:
            print(
                f"gradscope: report.html not written ({exc!r}); the records are complete: "
                f"gradscope report {run_dir}",
                file=sys.stderr,
                flush=True,
            )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _world_size() -> int:
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1
