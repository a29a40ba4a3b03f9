"""The run-directory schema (gradscope.load), piece by piece: what is valid passes unchanged,
what is not is dropped or repaired with one problem line each; and whether a run still runs,
from its process and its files."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

import gradscope
from gradscope import load
from gradscope.load import Progress, _Tally, clean_chunk, progress, validate_finding, validate_meta

GOOD_META = {
    "gradscope": "0.1",
    "torch": "2.x",
    "python": "3.11",
    "platform": "Linux",
    "command": "x",
    "argv": ["a"],
    "cwd": "/",
    "pid": 1,
    "config": {"clip": None},
    "models": {"": "MLP"},
    "started": "2026-01-01T00:00:00+0000",
    "ended": None,
    "status": "running",
    "exit_code": None,
    "world_size": 1,
    "steps": 3,
    "step_mode": None,
    "layers": [
        {"name": "0", "kind": "module", "type": "Linear", "family": None},
        {"name": "0.weight", "kind": "param", "module": "0", "type": "Linear"},
    ],
    "sites": ["1", "1#1"],
    "future_field": {"anything": [1, 2]},
}


def test_valid_metadata_passes_unchanged():
    problems: list[str] = []
    assert validate_meta(json.loads(json.dumps(GOOD_META)), problems) == GOOD_META
    assert problems == []


def test_each_bad_field_is_dropped_with_one_line():
    problems: list[str] = []
    bad = {
        **GOOD_META,
        "status": "exploded",
        "steps": -1,
        "pid": True,
        "layers": [GOOD_META["layers"][0], {"name": "p", "kind": "param", "type": "Linear"}, "x"],
        "sites": ["1", 7],
        "exit_code": 2.5,
    }
    meta = validate_meta(bad, problems)
    assert "status" not in meta and "steps" not in meta and "pid" not in meta
    assert "exit_code" not in meta and meta["world_size"] == 1
    assert meta["layers"] == [GOOD_META["layers"][0]] and meta["sites"] == ["1"]
    assert problems == [
        "run.json: pid is a boolean, expected a process id: ignored",
        "run.json: status is 'exploded', expected one of running, completed, failed, "
        "interrupted: ignored",
        "run.json: exit_code is 2.5, expected an exit code: ignored",
        "run.json: steps is -1, expected a step count: ignored",
        "run.json: layers entry 1 has module null, expected a string: ignored",
        "run.json: layers entry 2 is 'x', not an object: ignored",
        "run.json: 1 of the sites are not names: ignored",
    ]
    problems = []
    assert validate_meta([GOOD_META], problems) == {}
    assert problems == ["run.json is a list, not a JSON object: no run header, layer order unknown"]


FINDING = {
    "kind": "dead_units",
    "severity": "warning",
    "layer": "net.3",
    "first_step": 10,
    "last_step": 90,
    "evidence": {"dead_fraction": 0.82},
    "message": "m",
    "suggestion": "s",
    "remedies": [{"remedy": "swap"}],
    "module": None,
}


def test_a_valid_finding_passes_unchanged_and_a_bad_one_is_repaired():
    problems: list[str] = []
    tally = _Tally(problems, "findings.json")
    assert validate_finding(dict(FINDING), "finding 0", tally) == FINDING
    bad = {
        **FINDING,
        "layer": ["a"],
        "first_step": math.nan,
        "last_step": 5.0,
        "severity": "fatal",
        "remedies": {},
        "extra": {"kept": True},
    }
    del bad["message"]
    fixed = validate_finding(bad, "finding 1", tally)
    expected = {k: v for k, v in FINDING.items() if k != "remedies"}
    expected.update(
        layer="?",
        first_step=None,
        last_step=None,
        severity="unknown",
        message="",
        extra={"kept": True},
    )
    assert fixed == expected
    backwards = validate_finding({**FINDING, "first_step": 9, "last_step": 2}, "finding 2", tally)
    assert (backwards["first_step"], backwards["last_step"]) == (9, 9)
    assert validate_finding({**FINDING, "kind": ""}, "finding 3", tally) is None
    assert validate_finding(3, "finding 4", tally) is None
    tally.close()
    assert problems == [
        "findings.json: finding 1 (dead_units): severity is 'fatal', expected one of error, "
        "warning, info; layer is a list, expected a string; first_step is nan, expected a "
        "step; last_step is 5.0, expected a step; remedies is an object, expected a list; no "
        "message: repaired",
        "findings.json: finding 2 (dead_units): last_step 2 is before first_step 9: repaired",
        "findings.json: finding 3 has kind '', expected a name: ignored",
        "findings.json: finding 4 is 3, not an object: ignored",
    ]


def test_problems_of_one_file_are_capped_and_counted():
    problems: list[str] = []
    tally = _Tally(problems, "events.jsonl", " ")
    for i in range(25):
        tally.add(f"line {i} bad")
    tally.close()
    assert problems == [f"events.jsonl line {i} bad" for i in range(load.PER_FILE)] + [
        f"events.jsonl: {25 - load.PER_FILE} more problem(s) like these"
    ]


def _table(steps, kinds=None, layers=None, values=None) -> pa.Table:
    n = len(steps)
    return pa.table(
        {
            "step": steps,
            "layer": layers or ["a"] * n,
            "kind": kinds or ["param"] * n,
            "metric": ["grad_norm"] * n,
            "value": values if values is not None else [float(i) for i in range(n)],
        }
    )


def test_a_clean_chunk_passes_unchanged():
    problems: list[str] = []
    table = _table(pa.array([0, 1, 2], pa.int64()), values=[0.5, math.nan, math.inf])
    cleaned = clean_chunk(table, "part-000001.parquet", problems)
    assert problems == [] and cleaned.schema.equals(table.schema)
    assert cleaned.to_pandas().equals(table.to_pandas())  # NaN equal to NaN


def test_bad_rows_are_dropped_and_counted():
    problems: list[str] = []
    steps = pa.array([0.0, 1.0, math.nan, -1.0, 2.5, math.inf, 2.0**60, 3.0])
    table = _table(
        steps,
        kinds=["param", "run", "param", "param", "param", "param", "param", "banana"],
        layers=["a", "(run)", "a", "a", "a", "a", "a", "a"],
    )
    table = table.append_column("junk", pa.array([1] * 8))
    cleaned = clean_chunk(table, "part-000007.parquet", problems)
    assert cleaned.column_names == list(load.COLUMNS)
    assert cleaned.column("step").type == pa.int64()
    assert cleaned.column("step").to_pylist() == [0, 1]
    assert cleaned.column("value").to_pylist() == [0.0, 1.0]
    assert problems == [
        "part-000007.parquet: 6 of 8 rows dropped (5 with a step that is not a step number, 1 "
        "with an unknown kind or a missing name or value)",
        "part-000007.parquet: extra column(s) ignored: junk",
    ]


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda t: t.drop(["kind"]), "no kind column (it has: step, layer, metric, value)"),
        (lambda t: t.set_column(0, "step", pa.array(["0", "1"])), "column step holds string"),
        (lambda t: t.set_column(4, "value", pa.array([True, False])), "column value holds bool"),
        (lambda t: t.set_column(3, "metric", pa.array([1, 2])), "column metric holds int64"),
        (lambda t: t.append_column("step", pa.array([1, 2])), "column step appears twice"),
    ],
)
def test_a_chunk_with_wrong_columns_is_skipped(change, why):
    problems: list[str] = []
    assert clean_chunk(change(_table(pa.array([0, 1]))), "part-000003.parquet", problems) is None
    assert len(problems) == 1 and problems[0].startswith(f"part-000003.parquet unreadable ({why}")


def test_integral_float_and_small_integer_steps_are_taken():
    problems: list[str] = []
    cleaned = clean_chunk(_table(pa.array([0.0, 4.0])), "p", problems)
    assert cleaned.column("step").to_pylist() == [0, 4] and problems == []
    cleaned = clean_chunk(
        _table(pa.array([1, 2], pa.uint8()), values=pa.array([1, 2], pa.int32())), "p", problems
    )
    assert cleaned.column("step").type == pa.int64() and problems == []
    assert cleaned.column("value").type == pa.float64()


# -- is it still running? --------------------------------------------------------------------
def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def test_progress_of_a_closed_run_is_its_status():
    p = progress({"status": "failed", "steps": 7}, Path("/nonexistent"), 6, 7)
    assert (p.state, p.closed, p.why, p.steps, p.recorded) == ("failed", True, "", 7, 7)
    assert p.status_text == "failed" and p.steps_text == "7"
    p = progress({}, Path("/nonexistent"), -1, 0)
    assert (p.state, p.closed, p.steps, p.steps_text) == ("unknown", False, 0, "0")


def test_steps_come_from_the_records_when_run_json_is_behind():
    p = Progress("did not close", "why", 25, 20, 0)
    assert p.steps_text == "25 (20 with records; run.json said 0 when last written)"
    assert p.status_text == "ended without closing (killed?)" and not p.closed
    p = progress(
        {"status": "running", "steps": 0, "pid": os.getpid(), "started": _iso(time.time())},
        Path("/nonexistent"),
        24,
        25,
    )
    assert (p.state, p.steps, p.recorded, p.meta_steps) == ("running", 25, 25, 0)


def test_a_live_process_is_running_a_gone_or_younger_one_did_not_close(tmp_path):
    me = {"status": "running", "pid": os.getpid(), "started": _iso(time.time() + 5)}
    assert progress(me, tmp_path, -1, 0).state == "running"
    assert progress({**me, "host": socket.gethostname()}, tmp_path, -1, 0).state == "running"
    if os.path.exists("/proc/self/stat"):
        # a process younger than the run is another process that got the same id
        older = {**me, "started": _iso(time.time() - 3 * 86400)}
        p = progress(older, tmp_path, -1, 0)
        assert p.state == "did not close" and f"pid {os.getpid()}" in p.why
    # a process that has ended
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    p = progress({**me, "pid": child.pid}, tmp_path, 4, 5)
    assert p.state == "did not close" and p.why == (
        f"run.json says running, but its process (pid {child.pid}) is gone: the run ended "
        "without closing (killed?)"
    )


def test_a_run_on_another_machine_did_not_close_when_nothing_changed_for_long(tmp_path):
    (tmp_path / "metrics").mkdir()
    for name in ("run.json", "events.jsonl", "metrics/part-000001.parquet"):
        (tmp_path / name).write_text("x")
    meta = {"status": "running", "pid": 1, "host": "elsewhere." + socket.gethostname()}
    now = time.time()
    assert progress(meta, tmp_path, -1, 0, now=now).state == "running"  # just written
    old = now - load.STALE_SECS - 3600
    for p in [tmp_path / "metrics", *tmp_path.rglob("*")]:
        os.utime(p, (old, old))
    p = progress(meta, tmp_path, -1, 0, now=now)
    assert p.state == "did not close"
    assert p.why.startswith(
        "run.json says running, but nothing in the run directory changed for 1h 15m"
    )
    # a chunk written a minute ago: still running
    os.utime(tmp_path / "metrics/part-000001.parquet", (now - 60, now - 60))
    assert progress(meta, tmp_path, -1, 0, now=now).state == "running"


def test_metadata_is_not_in_the_dataframe_attrs(tmp_path):
    """run.json stays in Run.meta: pandas copies attrs deeply on every operation, which made a
    2,000-layer run's summary take a minute."""
    model = nn.Sequential(nn.Linear(3, 3))
    with gradscope.watch(model, out=tmp_path, quiet=True, report=False) as scope:
        model(torch.randn(2, 3)).sum().backward()
    run = gradscope.load_run(scope.run_dir)
    assert run.metrics.attrs == {} and run.meta["status"] == "completed"
    assert run.metrics[run.metrics["metric"] == "grad_norm"].attrs == {}
    assert np.isfinite(run.metrics["value"]).all()
