"""How far a run got and whether it is still going, from what is on disk: :class:`Progress`
and :func:`progress`, which checks whether a ``running`` run's process is alive (or its files
went stale)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import rundir
from .meta import ENDED

CLOSED = ENDED
STALE_SECS = 15 * 60.0
"""A ``running`` run whose process cannot be checked (another machine) and whose files have
not changed for this long is taken to have ended without closing."""


@dataclass(frozen=True)
class Progress:
    """How far a run got, from what is on disk (run.json is rewritten only now and then, and
    never again after a ``kill -9``).

    Attributes:
        state: ``completed``, ``failed``, ``interrupted`` (the run closed), ``running`` (its
            process is alive, or it wrote recently), ``did not close`` (run.json says running,
            but its process is gone, or nothing changed for :data:`STALE_SECS`), ``unknown``
            (no status recorded).
        why: Why ``did not close`` was concluded (empty otherwise).
        steps: The steps the run got through: the larger of run.json's count and the last
            recorded step + 1.
        recorded: How many distinct steps have records.
        meta_steps: run.json's step count (None when it has none).
    """

    state: str
    why: str
    steps: int
    recorded: int
    meta_steps: int | None

    @property
    def closed(self) -> bool:
        """The run ended and said how (completed, failed or interrupted)."""
        return self.state in CLOSED

    @property
    def status_text(self) -> str:
        """What a header shows as the status."""
        if self.state == "did not close":
            return "ended without closing (killed?)"
        return self.state

    @property
    def steps_text(self) -> str:
        """What a header shows as the steps: ``25``, ``25 (20 with records)``, ``25 (run.json
        said 4 when last written)``."""
        notes = []
        if self.recorded != self.steps:
            notes.append(f"{self.recorded} with records")
        if self.meta_steps is not None and self.meta_steps != self.steps:
            notes.append(f"run.json said {self.meta_steps} when last written")
        return f"{self.steps} ({'; '.join(notes)})" if notes else str(self.steps)


def progress(
    meta: dict[str, Any], path: Path, last_step: int, recorded: int, now: float | None = None
) -> Progress:
    """The run's :class:`Progress` from its (validated) metadata, the last step recorded
    (-1: none) and the number of distinct steps recorded."""
    meta_steps = meta.get("steps")
    steps = max(meta_steps if isinstance(meta_steps, int) else 0, last_step + 1)
    status = meta.get("status")
    why = ""
    if status in CLOSED:
        state = str(status)
    elif status != "running":
        state = "unknown"
    else:
        state, why = _liveness(meta, path, time.time() if now is None else now)
    return Progress(
        state, why, steps, recorded, meta_steps if isinstance(meta_steps, int) else None
    )


def _liveness(meta: dict[str, Any], path: Path, now: float) -> tuple[str, str]:
    """``running`` or ``did not close``, and why, for a run whose run.json says running."""
    pid, host = meta.get("pid"), meta.get("host")
    # a run.json that names no host is taken to be from this machine
    if isinstance(pid, int) and (host is None or host == socket.gethostname()):
        alive = _pid_alive(pid, meta.get("started"))
        if alive is False:
            return "did not close", (
                f"run.json says running, but its process (pid {pid}) is "
                "gone: the run ended without closing (killed?)"
            )
        if alive:
            return "running", ""
    newest = _newest_mtime(path)
    if newest is not None and now - newest > STALE_SECS:
        return "did not close", (
            f"run.json says running, but nothing in the run directory "
            f"changed for {_ago(now - newest)}: the run ended without "
            "closing (killed?), or it hangs"
        )
    return "running", ""


def _pid_alive(pid: int, started: Any) -> bool | None:
    """Whether process ``pid`` is alive and is the run's (not a later process that got its
    id); None where that cannot be told."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except (OSError, OverflowError, ValueError):
        return None
    try:  # Linux: a zombie is dead; a process younger than the run is another one
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        btime = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        born = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        begun = datetime.strptime(str(started), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        if born > begun + 2.0:
            return False
    except (OSError, ValueError, IndexError, StopIteration, OverflowError):
        pass
    return True


def _newest_mtime(path: Path) -> float | None:
    times = []
    for p in (path / rundir.RUN_JSON, path / rundir.EVENTS, path / rundir.METRICS):
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    try:
        for chunk in (path / rundir.METRICS).glob("part-*.parquet"):
            times.append(chunk.stat().st_mtime)
    except OSError:
        pass
    return max(times) if times else None


def _ago(secs: float) -> str:
    h, rem = divmod(int(secs), 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"
