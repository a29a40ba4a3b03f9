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
import json
import os
import tempfile
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
    """Write JSON atomically: a reader (or a crash) sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=True, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    """One line to events.jsonl, for writers outside the Store (after it closed)."""
    with open(run_dir / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=True, default=str) + "\n")
