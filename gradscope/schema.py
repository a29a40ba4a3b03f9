"""The checks behind the run-directory schema that :mod:`gradscope.load` describes: the fields
``run.json`` and a finding may hold (:data:`META_FIELDS`, :data:`FINDING_FIELDS`), the metrics
columns (:data:`COLUMNS`), :func:`validate_meta` and :func:`validate_finding`, which drop or
repair what is invalid, and :class:`_Tally`, which lists a file's problems one line each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .meta import RunStatus

COLUMNS = ("step", "layer", "kind", "metric", "value")
STATUSES = tuple(s.value for s in RunStatus)
SEVERITIES = ("error", "warning", "info")
MAX_STEP = 2**53  # steps are exact integers in float64 (and no run gets near)
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
    "models": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "an object of strings",
    ),
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
    "layers": (lambda v: _str_list(v) and bool(v), "a list of layer names"),
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
            self.problems.append(
                f"{self.source}: {self.count - PER_FILE} more problem(s) like these"
            )
        self.count = 0


def validate_meta(obj: Any, problems: list[str]) -> dict[str, Any]:
    """run.json's valid part: wrong-typed fields dropped, bad layer entries dropped."""
    if not isinstance(obj, dict):
        problems.append(
            f"run.json is {_type_name(obj)}, not a JSON object: no run header, layer order unknown"
        )
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
    if "layers" in out and out["layer"] not in out["layers"]:  # the primary is one of them
        issues.append("layers does not hold layer")
        out["layers"] = [out["layer"], *out["layers"]]
    first, last = out["first_step"], out["last_step"]
    if first is not None and last is not None and last < first:
        issues.append(f"last_step {last} is before first_step {first}")
        out["last_step"] = first
    if missing:
        issues.append(f"no {', '.join(missing)}")
    if issues:
        tally.add(f"{where} ({item['kind']}): {'; '.join(issues)}: repaired")
    return out
