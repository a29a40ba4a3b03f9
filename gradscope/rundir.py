"""The run directory: where one watched run's records live (the contract other tools read).

```
<out>/<run-name>/
  run.json        metadata and status (running|completed|failed|interrupted), rewritten atomically
  metrics/        Parquet chunks, one per flush: step, layer, kind, metric, value
  events.jsonl    one JSON object per line, appended and flushed as it happens
  findings.json   consolidated findings, written when the run ends (also on crash and Ctrl-C)
  tb/             TensorBoard event files
```

A run name is a single directory name; it can never escape the output root, and a name that is
taken gets a ``-1``, ``-2``... suffix instead of overwriting anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

RUN_JSON = "run.json"
METRICS = "metrics"
EVENTS = "events.jsonl"
FINDINGS = "findings.json"
TB = "tb"


def default_name(label: str) -> str:
    """``<YYYYmmdd-HHMMSS>-<label>``, e.g. ``20261126-203411-MLP``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label) or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"


def create(out: Path, name: str) -> Path:
    """Create ``out/name`` (or ``out/name-1``...) and return it.

    Raises:
        ValueError: The output root cannot be created or written (names the path and why).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"out={str(out)!r}: cannot create the output root ({exc.strerror or exc}); "
            "pass a writable directory"
        ) from None
    if not out.is_dir():
        raise ValueError(f"out={str(out)!r}: not a directory; pass a writable directory")
    root = out.resolve()
    for k in range(10_000):
        candidate = root / (name if k == 0 else f"{name}-{k}")
        if candidate.resolve().parent != root:  # defence in depth; Config already checks names
            raise ValueError(f"name={name!r}: would leave the output root {str(root)!r}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ValueError(
                f"out={str(out)!r}: cannot write in the output root ({exc.strerror or exc}); "
                "pass a writable directory"
            ) from None
        (candidate / METRICS).mkdir()
        (candidate / EVENTS).touch()
        return candidate
    raise ValueError(f"name={name!r}: 10000 runs with this name already exist in {str(root)!r}")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader (or a crash) sees the old file or the new one (see
    :func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=True, default=str) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``; returns ``path``.

    A regular file (or a new one) is written to a temporary file beside it and renamed over
    it, so a reader or a crash sees the old file or the new one; a new file gets the mode
    the umask gives every other file of the run, a replaced one keeps its mode. A symbolic
    link is written through: its target is replaced and the link stays. A special file (a
    terminal, ``/dev/stdout``, a FIFO) is written to as a stream, as it is.

    Raises:
        OSError: The file cannot be written (its directory is missing or read-only...).
    """
    target, stream = _destination(path)
    data = text.encode("utf-8")
    if stream:
        with open(target, "ab") as fh:
            fh.write(data)
        return path
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = -1, target
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:  # 0o666 less the umask, as open() creates every other file
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            )
            break
        except FileExistsError:
            continue
    if fd < 0:
        raise FileExistsError(f"{target.parent}: no free temporary name")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _destination(path: Path) -> tuple[Path, bool]:
    """Where a write to ``path`` lands (symbolic links followed), and whether that is a
    stream (a device or FIFO, or anything under /dev or /proc) rather than a regular file."""
    p = os.path.abspath(path)
    for _ in range(40):
        p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        if p.startswith(("/dev/", "/proc/")):
            return Path(p), True
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return Path(p), False
        if not stat.S_ISLNK(st.st_mode):
            return Path(p), not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))
        p = os.path.join(os.path.dirname(p), os.readlink(p))
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    """One line to events.jsonl, for writers outside the Store (after it closed)."""
    with open(run_dir / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=True, default=str) + "\n")
