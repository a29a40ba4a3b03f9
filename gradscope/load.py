"""Reading a run directory back: the long metrics table, the metadata, events and findings.

This module is the one place that knows what a valid run directory holds (the schema below):
``gradscope summary``, ``gradscope report`` and ``gradscope compare`` read through it, so they
only ever see valid data. A run that crashed or was killed is read as far as it got, and a
damaged one as far as it is readable: every complete Parquet chunk is loaded, temporary files
from an interrupted flush are ignored, a truncated last line of events.jsonl is skipped, and
whatever is invalid (a field of the wrong type, a chunk with the wrong columns, an event line
that is not a JSON object...) is dropped or repaired and listed in ``Run.problems``, one line
each, rather than raised.

The schema:

* ``run.json``: a JSON object; each field in :data:`META_FIELDS` has the type named there (a
  field of another type is dropped), ``layers`` is a list of objects with a string ``name``,
  ``kind`` ``param`` or ``module`` and a string ``type`` (parameters also a string ``module``),
  ``sites`` a list of strings; other fields are kept as they are.
* ``findings.json``: a list of findings; a finding is an object with the fields of
  :data:`FINDING_FIELDS` (a non-string ``kind`` drops it; other bad fields are repaired).
* ``events.jsonl``: one JSON object per line with a string ``event``; ``step``, where
  present, a step number.
* ``metrics/part-*.parquet``: columns :data:`COLUMNS`: ``step`` integers (or integral floats)
  in ``0..MAX_STEP``, ``layer``/``kind``/``metric`` strings, ``kind`` one of ``param``,
  ``module``, ``run``, ``value`` numbers (NaN and Inf are values: a non-finite gradient).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

COLUMNS = ("step", "layer", "kind", "metric", "value")
KINDS = ("param", "module", "run")
STATUSES = ("running", "completed", "failed", "interrupted")
CLOSED = ("completed", "failed", "interrupted")
SEVERITIES = ("error", "warning", "info")
MAX_STEP = 2**53  # steps are exact integers in float64 (and no run gets near)
STALE_SECS = 15 * 60.0
"""A ``running`` run whose process cannot be checked (another machine) and whose files have
not changed for this long is taken to have ended without closing."""
PER_FILE = 10  # problems listed per file; the rest are counted in one more line


def _is_int(v: Any, lo: int = 0, hi: int = MAX_STEP) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


META_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "gradscope": (_is_str, "a string"),
    "torch": (_is_str, "a string"),
    "python": (_is_str, "a string"),
    "platform": (_is_str, "a string"),
    "host": (_is_str, "a string"),
    "command": (_is_str, "a string"),
    "argv": (_str_list, "a list of strings"),
    "cwd": (_is_str, "a string"),
    "pid": (lambda v: _is_int(v, 1, 2**31 - 1), "a process id"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "models": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
               "an object of strings"),
    "started": (_or_null(_is_str), "a time"),
    "ended": (_or_null(_is_str), "a time"),
    "status": (lambda v: v in STATUSES, "one of " + ", ".join(STATUSES)),
    "exit_code": (_or_null(lambda v: _is_int(v, -(2**31), 2**31)), "an exit code"),
    "world_size": (lambda v: _is_int(v, 1, 2**31), "a number of processes"),
    "steps": (_is_int, "a step count"),
    "step_mode": (_or_null(_is_str), "a string"),
    "layers": (lambda v: isinstance(v, list), "a list"),
    "sites": (lambda v: isinstance(v, list), "a list"),
    "distributed": (lambda v: isinstance(v, dict), "an object"),
    "note": (_is_str, "a string"),
}
"""run.json's fields: a check of the value and what it should be."""

FINDING_FIELDS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "severity": (lambda v: v in SEVERITIES, "one of " + ", ".join(SEVERITIES), "unknown"),
    "layer": (_is_str, "a string", "?"),
    "first_step": (_or_null(_is_int), "a step", None),
    "last_step": (_or_null(_is_int), "a step", None),
    "evidence": (lambda v: isinstance(v, dict), "an object", {}),
    "message": (_is_str, "a string", ""),
    "suggestion": (_is_str, "a string", ""),
}
"""A finding's fields besides ``kind`` (a string, or the finding is dropped): a check, what it
should be, and the value a missing or bad one is replaced by."""
FINDING_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "remedies": (lambda v: isinstance(v, list), "a list"),
    "module": (_or_null(_is_str), "a string"),
}
"""Fields a finding may have; a bad one is dropped."""


def _one_line(text: object, limit: int = 200) -> str:
    out = " ".join(str(text).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return repr(v) if len(repr(v)) <= 24 else f"a {len(repr(v))}-digit number"
    if isinstance(v, str):
        return repr(v) if len(v) <= 24 else "a string"
    if isinstance(v, dict):
        return "an object"
    return "a list" if isinstance(v, list) else type(v).__name__


class _Tally:
    """The problems of one file: the first :data:`PER_FILE` as they are, then a count."""

    def __init__(self, problems: list[str], source: str, sep: str = ": ") -> None:
        self.problems = problems
        self.prefix = source + sep
        self.source = source
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if self.count <= PER_FILE:
            self.problems.append(_one_line(self.prefix + text, 300))

    def close(self) -> None:
        if self.count > PER_FILE:
            self.problems.append(f"{self.source}: {self.count - PER_FILE} more problem(s) "
                                 "like these")
        self.count = 0


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


def progress(meta: dict[str, Any], path: Path, last_step: int, recorded: int,
             now: float | None = None) -> Progress:
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
    return Progress(state, why, steps, recorded,
                    meta_steps if isinstance(meta_steps, int) else None)


def _liveness(meta: dict[str, Any], path: Path, now: float) -> tuple[str, str]:
    """``running`` or ``did not close``, and why, for a run whose run.json says running."""
    pid, host = meta.get("pid"), meta.get("host")
    # a run.json that names no host is taken to be from this machine
    if isinstance(pid, int) and (host is None or host == socket.gethostname()):
        alive = _pid_alive(pid, meta.get("started"))
        if alive is False:
            return "did not close", (f"run.json says running, but its process (pid {pid}) is "
                                     "gone: the run ended without closing (killed?)")
        if alive:
            return "running", ""
    newest = _newest_mtime(path)
    if newest is not None and now - newest > STALE_SECS:
        return "did not close", (f"run.json says running, but nothing in the run directory "
                                 f"changed for {_ago(now - newest)}: the run ended without "
                                 "closing (killed?), or it hangs")
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
        btime = next(float(line.split()[1]) for line in
                     Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
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


@dataclass
class Run:
    """A run directory, read back and validated (see the module's schema).

    Attributes:
        path: The run directory.
        meta: ``run.json`` (status, versions, config, layers in forward order...), its valid
            fields only.
        metrics: Long table with columns step, layer, kind, metric, value.
        events: ``events.jsonl`` records, in order (JSON objects with an ``event`` name).
        findings: ``findings.json`` (after a ``kill -9``: rebuilt from events.jsonl).
        problems: What could not be read or was invalid (a corrupt chunk, a missing file, a
            field of the wrong type; a run that did not close), one line each.
        progress: How far the run got and whether it closed, from what is on disk.
    """

    path: Path
    meta: dict[str, Any]
    metrics: pd.DataFrame
    events: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress("unknown", "", 0, 0, None))

    @property
    def steps(self) -> int:
        """The steps the run got through (from the records when run.json is behind)."""
        return self.progress.steps

    @property
    def closed(self) -> bool:
        """The run ended and recorded how; False while it runs and after a ``kill -9``."""
        return self.progress.closed

    @property
    def state(self) -> str:
        """``completed``, ``failed``, ``interrupted``, ``running``, ``did not close`` or
        ``unknown`` (see :class:`Progress`)."""
        return self.progress.state

    @property
    def layer_order(self) -> list[str]:
        """Layer names in forward order, as recorded in run.json (sites included)."""
        return layer_order(self.meta)

    def wide(self, metric: str, kind: str | None = None) -> pd.DataFrame:
        """One metric as a step x layer table, layers in forward order.

        Args:
            metric: A metric name (``grad_norm``, ``act_dead_fraction``...).
            kind: Restrict to ``param``, ``module`` or ``run`` rows (needed only if a metric
                exists for several kinds).

        Raises:
            KeyError: The run has no such metric (names the ones it has).
        """
        df = self.metrics
        rows = df[df["metric"] == metric]
        if kind is not None:
            rows = rows[rows["kind"] == kind]
        if rows.empty:
            have = sorted(df["metric"].unique().tolist())
            raise KeyError(f"metric {metric!r} not in this run; it has: {', '.join(have)}")
        table = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="last",
                                 dropna=False)
        rank = {name: i for i, name in enumerate(self.layer_order)}
        ordered = sorted(table.columns, key=lambda c: (rank.get(c, len(rank)), c))
        table = table[ordered]
        table.columns.name = metric
        return table


def layer_order(meta: dict[str, Any]) -> list[str]:
    """Layer names in forward order from (validated) metadata, activation sites included."""
    order = [e["name"] for e in meta.get("layers", [])]
    seen = set(order)
    for name in meta.get("sites", []):
        if name not in seen:
            order.append(name)
            seen.add(name)
    return order


# -- files --------------------------------------------------------------------------------------
def check_run_dir(path: Path) -> None:
    """Raise unless ``path`` is a directory that holds a run (run.json or metrics/).

    Raises:
        FileNotFoundError: ``path`` is missing, not a directory, unreadable, or holds neither
            run.json nor metrics/ (a one-line message naming it).
    """
    if not path.is_dir():
        what = "no such run directory" if not os.path.lexists(path) else \
            "not a directory, expected a run directory"
        raise FileNotFoundError(f"{str(path)!r}: {what}")
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise FileNotFoundError(f"{str(path)!r}: cannot read the run directory "
                                f"({exc.strerror or exc})") from None
    if rundir.RUN_JSON not in names and rundir.METRICS not in names:
        raise FileNotFoundError(
            f"{str(path)!r}: not a gradscope run directory (no run.json, no metrics/)")


def _read(path: Path, problems: list[str]) -> bytes | None:
    """A regular file's bytes; None when missing (no problem) or unreadable (a problem)."""
    name = path.name
    try:
        st = path.stat()
    except FileNotFoundError:
        if os.path.lexists(path):
            problems.append(f"{name}: a broken link: ignored")
        return None
    except OSError as exc:
        problems.append(f"{name} unreadable ({exc.strerror or exc}): ignored")
        return None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        problems.append(f"{name} is {what}: ignored")
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(f"{name} unreadable ({exc.strerror or exc}): ignored")
        return None


def _parse(data: bytes) -> Any:
    """JSON from UTF-8 bytes (NaN and Infinity allowed, as Python writes them).

    Raises:
        ValueError: Not UTF-8, not JSON, or nested too deep (the message says which).
    """
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ValueError("nested too deep") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({_one_line(exc, 80)})") from None


def read_meta(path: Path, problems: list[str]) -> dict[str, Any]:
    """run.json of the run directory ``path``, validated (``{}`` when missing or unusable)."""
    data = _read(path / rundir.RUN_JSON, problems)
    if data is None:
        if not os.path.lexists(path / rundir.RUN_JSON):
            problems.append("run.json missing: no run header, layer order unknown")
        return {}
    try:
        loaded = _parse(data)
    except ValueError as exc:
        problems.append(f"run.json unreadable, {exc}: no run header, layer order unknown")
        return {}
    return validate_meta(loaded, problems)


def validate_meta(obj: Any, problems: list[str]) -> dict[str, Any]:
    """run.json's valid part: wrong-typed fields dropped, bad layer entries dropped."""
    if not isinstance(obj, dict):
        problems.append(f"run.json is {_type_name(obj)}, not a JSON object: no run header, "
                        "layer order unknown")
        return {}
    tally = _Tally(problems, "run.json")
    meta: dict[str, Any] = {}
    for key, value in obj.items():
        check = META_FIELDS.get(key)
        if check is not None and not check[0](value):
            tally.add(f"{key} is {_type_name(value)}, expected {check[1]}: ignored")
            continue
        meta[key] = value
    if "layers" in meta:
        meta["layers"] = _valid_layers(meta["layers"], tally)
    if "sites" in meta:
        sites = [s for s in meta["sites"] if isinstance(s, str)]
        if len(sites) < len(meta["sites"]):
            tally.add(f"{len(meta['sites']) - len(sites)} of the sites are not names: ignored")
        meta["sites"] = sites
    tally.close()
    return meta


def _valid_layers(entries: list[Any], tally: _Tally) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        bad = None
        if not isinstance(e, dict):
            bad = f"is {_type_name(e)}, not an object"
        elif not isinstance(e.get("name"), str):
            bad = f"has name {_type_name(e.get('name'))}, expected a string"
        elif e.get("kind") not in ("param", "module"):
            bad = f"has kind {_type_name(e.get('kind'))}, expected 'param' or 'module'"
        elif not isinstance(e.get("type"), str):
            bad = f"has type {_type_name(e.get('type'))}, expected a string"
        elif e["kind"] == "param" and not isinstance(e.get("module"), str):
            bad = f"has module {_type_name(e.get('module'))}, expected a string"
        if bad is None:
            out.append(e)
        else:
            tally.add(f"layers entry {i} {bad}: ignored")
    return out


def read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """events.jsonl of the run directory ``path``: its valid lines (JSON objects with an
    ``event`` name; a ``step`` that is not a step number is dropped from its line)."""
    data = _read(path / rundir.EVENTS, problems)
    if not data:
        return []
    events: list[dict[str, Any]] = []
    tally = _Tally(problems, "events.jsonl", " ")
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ev = _parse(line)
        except ValueError as exc:
            why = "truncated write?" if i == last and str(exc).startswith("not JSON") else \
                str(exc)
            tally.add(f"line {i + 1} unreadable ({why}): skipped")
            continue
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
            what = "no event name" if isinstance(ev, dict) else f"{_type_name(ev)}"
            tally.add(f"line {i + 1} is not an event ({what}): skipped")
            continue
        if "step" in ev and not _is_int(ev["step"]) and ev["step"] is not None:
            tally.add(f"line {i + 1}: step is {_type_name(ev['step'])}, expected a step: "
                      "ignored")
            ev = {k: v for k, v in ev.items() if k != "step"}
        events.append(ev)
    tally.close()
    return events


def read_findings(path: Path, events: list[dict[str, Any]],
                  problems: list[str]) -> list[dict[str, Any]]:
    """findings.json of the run directory ``path``, validated; when it is missing or
    unusable, the findings as events.jsonl last told them."""
    file = path / rundir.FINDINGS
    data = _read(file, problems)
    if data is not None:
        try:
            loaded = _parse(data)
        except ValueError as exc:
            problems.append(f"findings.json unreadable, {exc}: findings rebuilt from "
                            "events.jsonl")
            return findings_from_events(events, problems)
        if isinstance(loaded, list):
            tally = _Tally(problems, "findings.json")
            out = [f for i, item in enumerate(loaded)
                   if (f := validate_finding(item, f"finding {i}", tally)) is not None]
            tally.close()
            return out
        problems.append(f"findings.json is {_type_name(loaded)}, not a list: findings rebuilt "
                        "from events.jsonl")
        return findings_from_events(events, problems)
    found = findings_from_events(events, problems)
    if found and not os.path.lexists(file):
        problems.append("findings.json missing (the run was killed?): findings rebuilt from "
                        "events.jsonl, as they were when raised")
    return found


def validate_finding(item: Any, where: str, tally: _Tally) -> dict[str, Any] | None:
    """A valid finding from ``item`` (bad fields repaired), or None when it has no kind."""
    if not isinstance(item, dict):
        tally.add(f"{where} is {_type_name(item)}, not an object: ignored")
        return None
    if not isinstance(item.get("kind"), str) or not item["kind"]:
        tally.add(f"{where} has kind {_type_name(item.get('kind'))}, expected a name: ignored")
        return None
    out = dict(item)
    issues, missing = [], []
    for key, (check, what, default) in FINDING_FIELDS.items():
        if key not in item:
            missing.append(key)
            out[key] = default
        elif not check(item[key]):
            issues.append(f"{key} is {_type_name(item[key])}, expected {what}")
            out[key] = default
    for key, (check, what) in FINDING_OPTIONAL.items():
        if key in item and not check(item[key]):
            issues.append(f"{key} is {_type_name(item[key])}, expected {what}")
            del out[key]
    first, last = out["first_step"], out["last_step"]
    if first is not None and last is not None and last < first:
        issues.append(f"last_step {last} is before first_step {first}")
        out["last_step"] = first
    if missing:
        issues.append(f"no {', '.join(missing)}")
    if issues:
        tally.add(f"{where} ({item['kind']}): {'; '.join(issues)}: repaired")
    return out


def finding_steps(f: dict[str, Any]) -> str:
    """A finding's steps as the summary and the report show them: ``12`` or ``12-40`` (``?``
    for a step it does not know)."""
    first, last = f.get("first_step"), f.get("last_step")
    a, b = ("?" if first is None else str(first)), ("?" if last is None else str(last))
    return a if a == b else f"{a}-{b}"


def findings_from_events(events: list[dict[str, Any]],
                         problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The findings as ``events.jsonl`` last told them (``finding`` when raised,
    ``finding_updated`` when the tracer named a module): what survives a ``kill -9``."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    tally = _Tally(problems if problems is not None else [], "events.jsonl")
    for i, event in enumerate(events):
        if event.get("event") not in ("finding", "finding_updated"):
            continue
        finding = validate_finding({k: v for k, v in event.items() if k != "event"},
                                   f"finding event {i + 1}", tally)
        if finding is None:
            continue
        kind = finding["kind"]
        key = (kind,) if kind == "nonfinite" else (kind, finding["layer"],
                                                  finding["first_step"])
        latest[key] = finding
    tally.close()
    return list(latest.values())


# -- metrics ------------------------------------------------------------------------------------
def chunk_files(path: Path, problems: list[str]) -> list[Path]:
    """The run's Parquet chunks, in order (regular files only; temporary ones left out)."""
    metrics = path / rundir.METRICS
    try:
        st = metrics.stat()
    except FileNotFoundError:
        problems.append("metrics/ missing: no metrics recorded")
        return []
    except OSError as exc:
        problems.append(f"metrics/ unreadable ({exc.strerror or exc}): no metrics")
        return []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("metrics is not a folder: no metrics")
        return []
    try:
        candidates = sorted(metrics / n for n in os.listdir(metrics)
                            if fnmatch.fnmatchcase(n, "part-*.parquet"))
    except OSError as exc:
        problems.append(f"metrics/ unreadable ({exc.strerror or exc}): no metrics")
        return []
    files = []
    tally = _Tally(problems, "metrics/")
    for f in candidates:
        try:
            regular = stat.S_ISREG(f.stat().st_mode)
        except OSError as exc:
            tally.add(f"{f.name} unreadable ({exc.strerror or exc}): its steps are missing")
            continue
        if regular:
            files.append(f)
        else:
            tally.add(f"{f.name} is not a regular file: ignored")
    tally.close()
    return files


def _is_text(t: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)
                or (is_view is not None and is_view(t)))


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a chunk with this Arrow schema cannot be read as metrics (None: it can)."""
    import pyarrow as pa

    names = schema.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        return (f"no {', '.join(missing)} column (it has: {', '.join(map(str, names[:8]))})")
    twice = [c for c in COLUMNS if names.count(c) > 1]
    if twice:
        return f"column {twice[0]} appears twice"
    for col in ("step", "value"):
        t = schema.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            return f"column {col} holds {t}, expected numbers"
    for col in ("layer", "kind", "metric"):
        t = schema.field(col).type
        if not _is_text(t):
            return f"column {col} holds {t}, expected strings"
    return None


def clean_chunk(table: pa.Table, name: str, problems: list[str]) -> pa.Table | None:
    """The valid rows of a metrics chunk as (step int64, layer, kind, metric, value float64);
    None when its columns are wrong. Rows with a bad step (missing, negative, fractional,
    non-finite, beyond :data:`MAX_STEP`), a missing name or value, or an unknown kind are
    dropped, and counted in one problem line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    why = schema_problem(table.schema)
    if why is not None:
        problems.append(f"{name} unreadable ({why}): its steps are missing")
        return None
    extra = [c for c in table.column_names if c not in COLUMNS]
    table = table.select(list(COLUMNS))
    n = table.num_rows
    step = table.column("step")
    if pa.types.is_integer(step.type):
        raw = step.fill_null(-1).to_numpy() if step.null_count else step.to_numpy()
        ok = (raw >= 0) & (raw <= MAX_STEP)
    else:
        raw = pc.fill_null(step.cast(pa.float64()), math.nan).to_numpy()
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(raw) & (raw >= 0) & (raw <= MAX_STEP) & (np.floor(raw) == raw)
    bad_steps = n - int(ok.sum())
    kind_ok = pc.fill_null(pc.is_in(table.column("kind"), value_set=pa.array(KINDS)), False)
    ok &= np.asarray(kind_ok.to_numpy(zero_copy_only=False), dtype=bool)
    for col in ("layer", "metric", "value"):
        if table.column(col).null_count:
            ok &= np.asarray(table.column(col).is_valid().to_numpy(zero_copy_only=False),
                             dtype=bool)
    dropped = n - int(ok.sum())
    if dropped:
        kinds = dropped - bad_steps
        detail = ", ".join(x for x in (f"{bad_steps} with a step that is not a step number"
                                       if bad_steps else "",
                                       f"{kinds} with an unknown kind or a missing name or "
                                       "value" if kinds else "") if x)
        problems.append(f"{name}: {dropped} of {n} rows dropped ({detail})")
        table = table.filter(pa.array(ok))
        raw = raw[ok]
    if extra:
        problems.append(f"{name}: extra column(s) ignored: {', '.join(map(str, extra[:8]))}")
    steps = pa.array(np.asarray(raw, dtype=np.int64), pa.int64())
    table = table.set_column(0, "step", steps)
    if table.column("value").type != pa.float64():
        table = table.set_column(4, "value", table.column("value").cast(pa.float64()))
    return table


def read_chunk(path: Path, problems: list[str]) -> pa.Table | None:
    """One Parquet chunk, read and cleaned (:func:`clean_chunk`); None when unreadable."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many kinds for a damaged file
        problems.append(f"{path.name} unreadable ({type(exc).__name__}: {_one_line(exc, 120)})"
                        ": its steps are missing")
        return None
    return clean_chunk(table, path.name, problems)


def _empty_metrics() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"step": pd.Series(dtype="int64"),
                         "layer": pd.Series(dtype=str), "kind": pd.Series(dtype=str),
                         "metric": pd.Series(dtype=str), "value": pd.Series(dtype="float64")})


def load_run(path: str | Path) -> Run:
    """Read the run directory at ``path``; what is invalid or unreadable is listed in
    ``Run.problems`` (see the module's schema), never raised.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a gradscope run directory.
    """
    import pandas as pd

    run_path = Path(path)
    check_run_dir(run_path)
    problems: list[str] = []
    meta = read_meta(run_path, problems)
    frames = []
    for chunk in chunk_files(run_path, problems):
        table = read_chunk(chunk, problems)
        if table is not None and table.num_rows:
            frames.append(table.to_pandas())
    if frames:
        metrics = pd.concat(frames, ignore_index=True)
        for col in ("layer", "kind", "metric"):
            metrics[col] = metrics[col].astype(str)
        last, recorded = int(metrics["step"].max()), int(metrics["step"].nunique())
    else:
        metrics, last, recorded = _empty_metrics(), -1, 0
    events = read_events(run_path, problems)
    findings = read_findings(run_path, events, problems)
    prog = progress(meta, run_path, last, recorded)
    if prog.why:
        problems.append(prog.why)
    return Run(run_path, meta, metrics, events, findings, problems, prog)
