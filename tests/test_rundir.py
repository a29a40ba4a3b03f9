"""The run directory contract, read back through every sink; crash safety; bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope

from models import mlp, train


@pytest.fixture
def finished_run(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out, name="r", flush_every=4) as scope:
        train(model, opt, 10)
    return scope.run_dir


def test_layout_and_metadata(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"run.json", "metrics", "events.jsonl", "findings.json", "tb"} <= names
    assert len(list((finished_run / "metrics").glob("part-*.parquet"))) == 3  # 4 + 4 + 2 steps
    meta = json.loads((finished_run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["steps"] == 10
    assert meta["torch"] == torch.__version__ and meta["gradscope"] == gradscope.__version__
    assert meta["config"]["flush_every"] == 4 and meta["world_size"] == 1
    assert meta["started"] and meta["ended"]
    assert json.loads((finished_run / "findings.json").read_text()) == []


def test_parquet_long_table_and_wide_view(finished_run):
    df = pd.concat(pd.read_parquet(p) for p in sorted((finished_run / "metrics").glob("*.parquet")))
    assert list(df.columns) == ["step", "layer", "kind", "metric", "value"]
    assert set(df["kind"].astype(str)) == {"param", "module", "run"}
    run = gradscope.load_run(finished_run)
    assert len(run.metrics) == len(df) and run.problems == []
    assert run.meta["status"] == "completed" and run.metrics.attrs == {}  # metadata: Run.meta
    assert (run.steps, run.closed, run.state) == (10, True, "completed")
    wide = run.wide("grad_norm")
    assert wide.shape == (10, 6)
    assert list(wide.columns) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    with pytest.raises(KeyError, match=r"not in this run; it has: .*grad_norm"):
        run.wide("no_such_metric")


def test_tensorboard_scalars_read_back_equal_the_store(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad_norm/0.weight", "loss", "grad_norm_total", "act_dead_fraction/1"} <= tags
    run = gradscope.load_run(finished_run)
    expected = run.wide("grad_norm")["0.weight"]
    events = acc.Scalars("grad_norm/0.weight")
    assert [e.step for e in events] == list(expected.index)
    assert [e.value for e in events] == pytest.approx(expected.tolist(), rel=1e-6)


def test_existing_name_gets_a_suffix_never_overwritten(out):
    model = mlp()
    dirs = []
    for _ in range(3):
        with gradscope.watch(model, out=out, name="same") as scope:
            pass
        dirs.append(scope.run_dir.name)
    assert dirs == ["same", "same-1", "same-2"]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", " x", "/abs"])
def test_run_names_cannot_escape_the_output_root(out, name):
    with pytest.raises(ValueError, match="name="):
        gradscope.watch(mlp(), out=out, name=name)
    assert not out.exists()


def test_bad_input_is_named_and_nothing_is_written(out, tmp_path):
    model = mlp()
    unknown = r"unknown gradscope option 'flush_evry' \(did you mean 'flush_every'\?\)"
    with pytest.raises(TypeError, match=unknown):
        gradscope.watch(model, out=out, flush_evry=5)
    with pytest.raises(ValueError, match=r"activation_every=-1: expected an integer >= 1"):
        gradscope.watch(model, out=out, activation_every=-1)
    with pytest.raises(TypeError, match=r"flush_every=2.5: expected an integer"):
        gradscope.watch(model, out=out, flush_every=2.5)
    with pytest.raises(TypeError, match=r"expects an nn\.Module.*got int"):
        gradscope.watch(42, out=out)
    with pytest.raises(TypeError, match=r"expected a torch\.optim\.Optimizer"):
        gradscope.watch(model, "adam", out=out)
    with pytest.raises(ValueError, match="step_on='epoch'"):
        gradscope.watch(model, out=out, step_on="epoch")
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot create the output root"):
        gradscope.watch(model, out=blocker / "runs")
    with pytest.raises(ValueError, match="nothing to watch"):
        gradscope.watch(model, out=out, include=["nope*"])
    assert not out.exists() or not any(out.iterdir())


def test_kill_9_keeps_everything_up_to_the_last_flush(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, gradscope, sys
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scope = gradscope.watch(model, out={str(tmp_path)!r}, name="k", flush_every=5)
        step = 0
        while True:
            opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
            step += 1
            if step == 12:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    run = gradscope.load_run(tmp_path / "k")
    assert run.meta["status"] == "running"  # run.json could not say otherwise
    assert run.state == "did not close" and not run.closed
    # nothing unreadable (findings, if any were raised, come back from events.jsonl)
    assert [p for p in run.problems if "rebuilt from events.jsonl" not in p] == [
        f"run.json says running, but its process (pid {proc.pid}) is gone: the run ended "
        "without closing (killed?)"
    ]
    steps = sorted(set(run.metrics["step"]))
    assert len(steps) >= 10 and steps == list(range(len(steps)))  # whole flushes only


def test_loader_reports_what_it_cannot_read(finished_run):
    chunk = sorted((finished_run / "metrics").glob("*.parquet"))[-1]
    chunk.write_bytes(b"garbage")
    with open(finished_run / "events.jsonl", "a") as fh:
        fh.write('{"event": "x", "step": 1}\n{"event": "trunc')
    run = gradscope.load_run(finished_run)
    assert any("unreadable" in p and chunk.name in p for p in run.problems)
    assert any("events.jsonl line 2" in p for p in run.problems)
    assert run.events == [{"event": "x", "step": 1}]
    assert len(run.wide("grad_norm")) == 8  # the two good chunks
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        gradscope.load_run(finished_run / "nope")
    with pytest.raises(FileNotFoundError, match="not a gradscope run directory"):
        gradscope.load_run(finished_run / "metrics")


def test_flush_secs_flushes_slow_runs(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out, flush_every=1000, flush_secs=1e-9) as scope:
        train(model, opt, 3)
        assert len(list((scope.run_dir / "metrics").glob("*.parquet"))) == 3


def test_nan_values_survive_the_round_trip(out):
    model = nn.Sequential(nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out) as scope:
        opt.zero_grad()
        model(torch.full((2, 8), float("nan"))).sum().backward()
        opt.step()
    value = scope.load().wide("grad_norm").loc[0, "0.weight"]
    assert math.isnan(value)


def test_every_recorded_metric_is_documented(finished_run, out):
    from gradscope.records import METRICS

    readme = (Path(__file__).resolve().parents[1] / "reports" / "README.md").read_text()
    run = gradscope.load_run(finished_run)
    recorded = set(run.metrics["metric"])
    assert recorded <= set(METRICS), recorded - set(METRICS)
    for metric in METRICS:
        assert f"`{metric}`" in readme, f"reports/README.md does not document {metric}"


def test_kill_9_keeps_the_findings_raised_so_far(tmp_path):
    """findings.json is written at the end; after a kill -9 the loader rebuilds the findings
    from events.jsonl, where each was appended (and flushed) when raised."""
    script = textwrap.dedent(
        f"""
        import torch, gradscope
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            model[0].bias.fill_(-100.0)  # every unit dead for inputs in [0, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scope = gradscope.watch(model, out={str(tmp_path)!r}, name="k", flush_every=5,
                                activation_every=1, quiet=True)
        step = 0
        while True:
            opt.zero_grad(); model(torch.rand(32, 4)).sum().backward(); opt.step()
            step += 1
            if step == 12:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert not (tmp_path / "k" / "findings.json").exists()
    run = gradscope.load_run(tmp_path / "k")
    assert [(f["kind"], f["layer"], f["first_step"]) for f in run.findings] == [
        ("dead_units", "1", 0)
    ]
    assert any("rebuilt from events.jsonl" in p for p in run.problems)


@pytest.mark.slow
def test_after_kill_9_the_steps_and_the_state_come_from_the_disk(tmp_path, capsys):
    """run.json is rewritten only now and then and never after a kill -9: the steps come from
    the records, and a "running" run whose process is gone is said not to have closed, by
    load_run, the summary and the report."""
    from test_report import Page

    from gradscope.cli import entry

    script = textwrap.dedent(
        f"""
        import time, torch, gradscope
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scope = gradscope.watch(model, out={str(tmp_path)!r}, name="k", flush_every=5,
                                quiet=True)
        for step in range(25):
            opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    run_dir = tmp_path / "k"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while len(list((run_dir / "metrics").glob("part-*.parquet"))) < 5:  # 25 steps / 5
            assert time.monotonic() < deadline, "the fifth flush never came"
            time.sleep(0.05)
        running = gradscope.load_run(run_dir)
        assert running.state == "running" and not running.closed  # alive: pid checked
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    run = gradscope.load_run(run_dir)
    assert run.meta["status"] == "running" and run.meta["steps"] <= 25
    assert (run.steps, run.progress.recorded) == (25, 25)
    assert run.metrics["step"].max() == 24 and run.metrics["step"].nunique() == 25
    assert run.state == "did not close" and not run.closed
    note = (
        f"run.json says running, but its process (pid {proc.pid}) is gone: the run ended "
        "without closing (killed?)"
    )
    assert note in run.problems
    steps = (
        "25"
        if run.meta["steps"] == 25
        else f"25 (run.json said {run.meta['steps']} when last written)"
    )
    assert run.progress.steps_text == steps

    assert entry(["summary", str(run_dir)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"status=ended without closing (killed?) steps={steps}" in text
    assert f"note: {note}" in text
    assert entry(["report", str(run_dir)]) == 0
    capsys.readouterr()
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    assert "status status-did-not-close" in [a.get("class") for t, a in page.tags if t == "span"]
    body = " ".join(page.text)
    assert "ended without closing (killed?)" in body and note in body
    assert f"steps {steps}" in " ".join(body.split())


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_json_and_findings_json_respect_the_umask(out, umask):
    """Every file of a run directory gets the mode the umask gives a new file (teammates on
    a shared disk read run.json like the rest), including the atomically replaced ones."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        model = mlp()
        with gradscope.watch(model, out=out, name="m", quiet=True) as scope:
            model(torch.randn(4, 8)).sum().backward()
        probe = out / "probe"
        probe.write_text("x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(probe.stat().st_mode) == expected
    for name in ("run.json", "findings.json", "events.jsonl", "report.html"):
        assert stat.S_IMODE((scope.run_dir / name).stat().st_mode) == expected, name
    for chunk in (scope.run_dir / "metrics").glob("*.parquet"):
        assert stat.S_IMODE(chunk.stat().st_mode) == expected
    # a rewrite keeps the file's mode (a user's chmod stays)
    (scope.run_dir / "run.json").chmod(0o640)
    from gradscope import rundir

    rundir.write_json(scope.run_dir / "run.json", {"status": "completed"})
    assert stat.S_IMODE((scope.run_dir / "run.json").stat().st_mode) == 0o640
    assert not [p for p in scope.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_write_text_goes_through_links_and_streams_special_files(tmp_path):
    import os
    import stat
    import threading

    from gradscope import rundir

    # a link: its target is replaced, the link stays a link
    target = tmp_path / "real" / "page.html"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    chain = tmp_path / "chain.html"
    chain.symlink_to("link.html")  # relative, through another link
    assert rundir.write_text(chain, "new") == chain
    assert chain.is_symlink() and link.is_symlink() and os.readlink(chain) == "link.html"
    assert target.read_text() == "new" and not target.is_symlink()
    # a dangling link: the file it names is created
    dangling = tmp_path / "dangling.html"
    dangling.symlink_to(tmp_path / "real" / "later.html")
    rundir.write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "real" / "later.html").read_text() == "made"
    # a FIFO is a stream: written to, not replaced
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    rundir.write_text(fifo, "through the pipe")
    reader.join(timeout=30)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
    # a character device stays one
    rundir.write_text(Path("/dev/null"), "nothing")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a link loop and a folder are OSErrors (the CLI's one-line "cannot write")
    loop = tmp_path / "loop.html"
    loop.symlink_to(loop)
    with pytest.raises(OSError):
        rundir.write_text(loop, "x")
    with pytest.raises(OSError):
        rundir.write_text(tmp_path / "real", "x")
    assert (tmp_path / "real").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []
