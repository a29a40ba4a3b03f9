"""The corruption corpus: a real run directory damaged in many ways, each read by
``gradscope summary``, ``gradscope report``, ``gradscope compare`` (in-process, through the
console script's entry point) and ``load_run``. No traceback, ever: exit 0 with the damage
listed as problems (in ``Run.problems``, the summary's notes and the report's "partial" box),
or, where the directory is not a run at all, exit 2 with one line on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_report import Page

import gradscope
from gradscope.cli import entry

from models import mostly_dead_linear


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One real run: a dead_units finding, activations, 3 Parquet chunks, events, tb/."""
    out = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    model = mostly_dead_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with gradscope.watch(
        model,
        opt,
        out=out,
        name="base",
        activation_every=1,
        flush_every=4,
        quiet=True,
        report=False,
    ) as scope:
        for _ in range(12):
            opt.zero_grad()
            model(torch.rand(32, 4, generator=gen)).square().mean().backward()
            opt.step()
    run = gradscope.load_run(scope.run_dir)
    assert run.problems == [] and len(run.findings) == 1 and run.steps == 12
    assert len(list((scope.run_dir / "metrics").glob("part-*.parquet"))) == 3
    return scope.run_dir


# -- the damage -------------------------------------------------------------------------------
def _meta(d: Path) -> dict:
    return json.loads((d / "run.json").read_text())


def _set_meta(d: Path, **fields) -> None:
    (d / "run.json").write_text(json.dumps({**_meta(d), **fields}))


def _finding(d: Path) -> dict:
    return json.loads((d / "findings.json").read_text())[0]


def _chunk(d: Path, k: int = 2) -> Path:
    return d / "metrics" / f"part-{k:06d}.parquet"


def _rewrite_chunk(d: Path, change) -> None:
    path = _chunk(d)
    table = change(pq.read_table(path))
    pq.write_table(table, path)


def _set_column(name, values_of):
    def change(table):
        i = table.column_names.index(name)
        return table.set_column(i, name, values_of(table))

    return change


def _replace_with_dir(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def _append_events(d: Path, *lines: bytes) -> None:
    with open(d / "events.jsonl", "ab") as fh:
        for line in lines:
            fh.write(line + b"\n")


# name -> (damage, a pattern one of Run.problems must match; None: nothing to report)
CASES = {
    # run.json
    "run.json null": (
        lambda d: (d / "run.json").write_text("null"),
        "run.json is null, not a JSON object",
    ),
    "run.json []": (
        lambda d: (d / "run.json").write_text("[]"),
        "run.json is a list, not a JSON object",
    ),
    "run.json a string": (
        lambda d: (d / "run.json").write_text('"hello"'),
        "run.json is 'hello', not a JSON object",
    ),
    "run.json empty": (lambda d: (d / "run.json").write_bytes(b""), "run.json unreadable"),
    "run.json truncated": (
        lambda d: (d / "run.json").write_bytes((d / "run.json").read_bytes()[:300]),
        "run.json unreadable, not JSON",
    ),
    "run.json invalid UTF-8": (
        lambda d: (d / "run.json").write_bytes(b'{"status": "compl\xff\xfeted"}'),
        "run.json unreadable, not UTF-8",
    ),
    "run.json nested garbage": (
        lambda d: (d / "run.json").write_text("[" * 100_000),
        "run.json unreadable",
    ),
    "run.json wrong field types": (
        lambda d: _set_meta(
            d,
            status=5,
            steps="ten",
            pid="x",
            config=[],
            models=3,
            started=7,
            sites={"a": 1},
            argv="python",
            world_size=0,
        ),
        "run.json: status is 5, expected one of",
    ),
    "run.json layers is 5": (
        lambda d: _set_meta(d, layers=5),
        "run.json: layers is 5, expected a list",
    ),
    "run.json bad layer entries": (
        lambda d: _set_meta(
            d,
            layers=[
                1,
                {"name": 3},
                {"name": "x", "kind": "param", "type": "Linear"},
                {"name": "y", "kind": "banana", "type": "T"},
                *_meta(d)["layers"],
            ],
            sites=["1", 2, None],
        ),
        "run.json: layers entry 0 is 1, not an object",
    ),
    "run.json huge numbers": (
        lambda d: (d / "run.json").write_text(
            json.dumps({**_meta(d), "pid": 10**30, "exit_code": 1e308}).replace(
                '"steps": 12', '"steps": ' + "9" * 500
            )
        ),
        "run.json: steps is a 500-digit number",
    ),
    "run.json NaN and negative steps": (
        lambda d: (d / "run.json").write_text(
            json.dumps({**_meta(d), "steps": float("nan"), "world_size": -3})
        ),
        "run.json: steps is nan, expected a step count",
    ),
    "run.json unknown status": (
        lambda d: _set_meta(d, status="exploded"),
        "run.json: status is 'exploded'",
    ),
    "run.json missing": (lambda d: (d / "run.json").unlink(), "run.json missing"),
    "run.json is a folder": (
        lambda d: _replace_with_dir(d / "run.json"),
        "run.json is a folder: ignored",
    ),
    "run.json is a FIFO": (
        lambda d: ((d / "run.json").unlink(), os.mkfifo(d / "run.json")),
        "run.json is not a regular file",
    ),
    "run.json is a link loop": (
        lambda d: ((d / "run.json").unlink(), (d / "run.json").symlink_to(d / "run.json")),
        "run.json unreadable",
    ),
    # findings.json
    "findings.json {}": (
        lambda d: (d / "findings.json").write_text("{}"),
        "findings.json is an object, not a list",
    ),
    "findings.json [1]": (
        lambda d: (d / "findings.json").write_text("[1]"),
        "findings.json: finding 0 is 1, not an object",
    ),
    "finding layer is a list": (
        lambda d: (d / "findings.json").write_text(
            json.dumps([{**_finding(d), "layer": ["a", "b"]}])
        ),
        "findings.json: finding 0 (dead_units): layer is a list, expected a string",
    ),
    "finding fields of wrong types": (
        lambda d: (d / "findings.json").write_text(
            json.dumps(
                [
                    {
                        **_finding(d),
                        "first_step": "x",
                        "last_step": -1,
                        "severity": 3,
                        "message": None,
                        "evidence": [],
                        "remedies": "x",
                        "suggestion": {"a": [1]},
                    }
                ]
            )
        ),
        "findings.json: finding 0 (dead_units): severity is 3, expected one of error, warning, "
        "info; first_step is 'x', expected a step; last_step is -1",
    ),
    "finding without kind": (
        lambda d: (d / "findings.json").write_text(
            json.dumps([{"layer": "x"}, {**_finding(d), "kind": ["dead"]}])
        ),
        "findings.json: finding 0 has kind null, expected a name: ignored",
    ),
    "finding nested garbage": (
        lambda d: (d / "findings.json").write_text(
            json.dumps(
                [
                    {
                        **_finding(d),
                        "evidence": {
                            "deep": json.loads("[" * 300 + "]" * 300),
                            "nan": float("nan"),
                            "big": 10**400,
                        },
                    }
                ]
            )
        ),
        None,
    ),
    "findings.json truncated": (
        lambda d: (d / "findings.json").write_bytes((d / "findings.json").read_bytes()[:40]),
        "findings.json unreadable, not JSON",
    ),
    "findings.json empty": (
        lambda d: (d / "findings.json").write_bytes(b""),
        "findings.json unreadable, not JSON",
    ),
    "findings.json is a folder": (
        lambda d: _replace_with_dir(d / "findings.json"),
        "findings.json is a folder",
    ),
    # events.jsonl
    "events.jsonl invalid UTF-8": (
        lambda d: _append_events(d, b'{"event": "x\xff"}'),
        r"r:events.jsonl line \d+ unreadable \(not UTF-8",
    ),
    "events.jsonl is a folder": (
        lambda d: _replace_with_dir(d / "events.jsonl"),
        "events.jsonl is a folder",
    ),
    "events.jsonl lines that are not events": (
        lambda d: _append_events(
            d, b"1", b"[]", b"null", b'"x"', b'{"no_event": 1}', b'{"event": 5}'
        ),
        r"r:events.jsonl line \d+ is not an event \(a list\)",
    ),
    "events.jsonl truncated last line": (
        lambda d: _append_events(d, b'{"event": "find'),
        r"r:events.jsonl line \d+ unreadable \(truncated write\?\)",
    ),
    "events.jsonl bad steps": (
        lambda d: _append_events(
            d,
            b'{"event": "remedy", "remedy": "guard", "action": "skip_step", "step": "x"}',
            b'{"event": "remedy", "remedy": "guard", "action": "skip_step", "step": -1e400}',
        ),
        r"r:events.jsonl line \d+: step is 'x', expected a step",
    ),
    "finding events of garbage, no findings.json": (
        lambda d: (
            (d / "findings.json").unlink(),
            _append_events(
                d,
                b'{"event": "finding", "kind": [1]}',
                b'{"event": "finding", "kind": "dead_units", "layer": {"a": 1}, '
                b'"first_step": "x", "severity": "error", "last_step": 2}',
            ),
        ),
        r"r:events.jsonl: finding event \d+ has kind a list",
    ),
    "events.jsonl is a FIFO": (
        lambda d: ((d / "events.jsonl").unlink(), os.mkfifo(d / "events.jsonl")),
        "events.jsonl is not a regular file",
    ),
    "events.jsonl empty": (lambda d: (d / "events.jsonl").write_bytes(b""), None),
    "events.jsonl a million blank lines and junk": (
        lambda d: _append_events(d, b"\n" * 100_000, *[b"junk"] * 50),
        r"r:events.jsonl: 40 more problem\(s\) like these",
    ),
    # metrics
    "chunk truncated": (
        lambda d: _chunk(d).write_bytes(_chunk(d).read_bytes()[:500]),
        "part-000002.parquet unreadable",
    ),
    "chunk garbage": (
        lambda d: _chunk(d).write_bytes(b"PAR1 this is not parquet PAR1"),
        "part-000002.parquet unreadable",
    ),
    "chunk empty file": (lambda d: _chunk(d).write_bytes(b""), "part-000002.parquet unreadable"),
    "chunk extra column": (
        lambda d: _rewrite_chunk(
            d, lambda t: t.append_column("junk", pa.array(["j"] * t.num_rows))
        ),
        "part-000002.parquet: extra column(s) ignored",
    ),
    "chunk missing value column": (
        lambda d: _rewrite_chunk(d, lambda t: t.drop(["value"])),
        "part-000002.parquet unreadable (no value column",
    ),
    "chunk value as strings": (
        lambda d: _rewrite_chunk(
            d,
            _set_column(
                "value", lambda t: pa.array([str(v) for v in t.column("value").to_pylist()])
            ),
        ),
        "column value holds string, expected numbers",
    ),
    "chunk layer as integers": (
        lambda d: _rewrite_chunk(d, _set_column("layer", lambda t: pa.array(range(t.num_rows)))),
        "column layer holds int64, expected strings",
    ),
    "chunk NaN, inf and fractional steps": (
        lambda d: _rewrite_chunk(
            d,
            _set_column(
                "step",
                lambda t: pa.array(
                    [
                        [float("nan"), float("inf"), 4.5][i % 4] if i % 4 < 3 else 5.0
                        for i in range(t.num_rows)
                    ]
                ),
            ),
        ),
        "part-000002.parquet: ",
    ),
    "chunk negative steps": (
        lambda d: _rewrite_chunk(
            d, _set_column("step", lambda t: pa.array([-5] * t.num_rows, pa.int64()))
        ),
        "rows dropped (",
    ),
    "chunk huge steps": (
        lambda d: _rewrite_chunk(
            d, _set_column("step", lambda t: pa.array([2**62] * (t.num_rows - 1) + [7], pa.int64()))
        ),
        "with a step that is not a step number",
    ),
    "chunk unknown kind and null names": (
        lambda d: _rewrite_chunk(
            d,
            lambda t: t.set_column(
                2, "kind", pa.array(["bogus", *t.column("kind").to_pylist()[1:]])
            ).set_column(
                1,
                "layer",
                pa.array([None] * 3 + [str(x) for x in t.column("layer").to_pylist()[3:]]),
            ),
        ),
        "with an unknown kind or a missing name or value",
    ),
    "chunk huge and non-finite values": (
        lambda d: _rewrite_chunk(
            d,
            _set_column(
                "value",
                lambda t: pa.array(
                    [
                        [1e308, float("inf"), -float("inf"), float("nan")][i % 4]
                        for i in range(t.num_rows)
                    ]
                ),
            ),
        ),
        None,
    ),
    "chunk is a folder": (
        lambda d: _replace_with_dir(_chunk(d)),
        "part-000002.parquet is not a regular file",
    ),
    "chunk repeated": (lambda d: shutil.copy(_chunk(d, 1), _chunk(d, 9)), None),
    "metrics is a file": (
        lambda d: (shutil.rmtree(d / "metrics"), (d / "metrics").write_text("x")),
        "metrics is not a folder",
    ),
    "tb is a file": (lambda d: (shutil.rmtree(d / "tb"), (d / "tb").write_text("x")), None),
    "everything but run.json gone": (
        lambda d: [
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            for p in d.iterdir()
            if p.name != "run.json"
        ],
        "no metrics recorded",
    ),
}

UNREADABLE = {  # as a user who cannot read them (root reads everything: dropped to nobody)
    "run.json unreadable": (
        lambda d: (d / "run.json").chmod(0),
        "run.json unreadable (Permission denied)",
    ),
    "findings.json unreadable": (
        lambda d: (d / "findings.json").chmod(0),
        "findings.json unreadable (Permission denied)",
    ),
    "events.jsonl unreadable": (
        lambda d: (d / "events.jsonl").chmod(0),
        "events.jsonl unreadable (Permission denied)",
    ),
    "chunk unreadable": (lambda d: _chunk(d).chmod(0), "part-000002.parquet unreadable"),
    "metrics unreadable": (
        lambda d: (d / "metrics").chmod(0),
        "metrics/ unreadable (Permission denied)",
    ),
}

NOT_A_RUN = {
    "an empty folder": lambda d: [
        shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()
    ],
    "only findings and events": lambda d: (shutil.rmtree(d / "metrics"), (d / "run.json").unlink()),
    "a file": lambda d: (shutil.rmtree(d), d.write_text("not a run")),
    "nothing there": lambda d: shutil.rmtree(d),
    "a link to nowhere": lambda d: (shutil.rmtree(d), d.symlink_to(d.parent / "nowhere")),
}


def test_the_corpus_is_big_enough():
    assert len(CASES) + len(UNREADABLE) >= 30


# -- reading it ---------------------------------------------------------------------------------
def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = entry([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _read_everything(base: Path, d: Path, out: Path, capsys, expect: str | None) -> None:
    run = gradscope.load_run(d)
    if expect is not None:
        pattern = expect if expect.startswith("r:") else re.escape(expect)
        assert any(re.search(pattern.removeprefix("r:"), p) for p in run.problems), run.problems
    assert all("\n" not in p for p in run.problems)
    code, text, err = _run(["summary", d, "--top", "0"], capsys)
    assert code == 0 and err == "", err
    flat = "".join(text.split())  # the console wraps long lines
    for problem in run.problems:
        assert "note:" + "".join(problem.split()) in flat
    code, text, err = _run(["report", d, "-o", out / "report.html"], capsys)
    assert code == 0 and err == "" and text.strip() == str(out / "report.html"), err
    body = " ".join(Page((out / "report.html").read_text(encoding="utf-8")).text)
    if run.problems:
        assert "This report is partial." in body
    for problem in run.problems:
        assert problem in body
    code, text, err = _run(["compare", base, d, "-o", out / "compare.html"], capsys)
    assert code == 0 and err == "", err
    body = " ".join(Page((out / "compare.html").read_text(encoding="utf-8")).text)
    for problem in run.problems:
        assert f"B: {problem}" in body


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_is_read_as_far_as_it_is_valid(base, tmp_path, capsys, case):
    damage, expect = CASES[case]
    d = tmp_path / "run"
    shutil.copytree(base, d, symlinks=True)
    damage(d)
    _read_everything(base, d, tmp_path, capsys, expect)


@contextlib.contextmanager
def _unprivileged():
    """Run the block as a user that file permissions apply to (root: as nobody)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_file_is_a_problem_not_a_traceback(base, capsys, case):
    damage, expect = UNREADABLE[case]
    # a folder every user can reach (tmp_path is root's alone)
    root = Path(tempfile.mkdtemp(prefix="gradscope-corpus-"))
    try:
        root.chmod(0o777)
        d = root / "run"
        shutil.copytree(base, d)
        for p in [d, *d.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        copy = root / "base"
        shutil.copytree(base, copy)
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        damage(d)
        # the modules and the report's templates are read while they are readable (a clone in a
        # private temporary folder is not readable by the unprivileged user)
        import gradscope.report
        from gradscope.report.compare import write_compare

        gradscope.report.write_report(copy, out=root / "warm.html")
        write_compare(copy, copy, root / "warm-compare.html")

        with _unprivileged():
            _read_everything(copy, d, root, capsys, expect)
    finally:
        for p in [root, *root.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o700 if p.is_dir() and not p.is_symlink() else stat.S_IRUSR)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", list(NOT_A_RUN))
def test_what_is_not_a_run_is_a_one_line_error(base, tmp_path, capsys, case):
    d = tmp_path / "run"
    shutil.copytree(base, d)
    NOT_A_RUN[case](d)
    with pytest.raises(FileNotFoundError):
        gradscope.load_run(d)
    for args in (
        ["summary", d],
        ["report", d, "-o", tmp_path / "r.html"],
        ["compare", base, d, "-o", tmp_path / "c.html"],
        ["compare", d, base, "-o", tmp_path / "c.html"],
    ):
        code, out, err = _run(args, capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
        assert str(d.name) in err
