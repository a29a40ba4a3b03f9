"""Nothing gradscope does may raise into the program it watches.

A fault is injected into each entry point of the guard in turn (``GRADSCOPE_FAULTS``): the
training's output, exit code and final weights must be those of the unwatched program, the
fault must have fired (one stderr line naming its entry point), and the run must still close.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope import guard
from gradscope.guard import ENTRY_POINTS, Deliberate, Guard, InjectedFault

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import every_entry

SCRIPT = Path(__file__).parent / "scripts" / "every_entry.py"

# entry points this in-process loop passes through; the other three need a process of their own
IN_PROCESS = [
    e
    for e in ENTRY_POINTS
    if e not in ("atexit", "discover", "signal") and (e != "scaler" or every_entry.HAS_SCALER)
]  # a CPU GradScaler: torch >= 2.3


# -- the guard on its own --------------------------------------------------------------------------
def _guard() -> tuple[Guard, list[tuple[str, str, str]]]:
    told: list[tuple[str, str, str]] = []
    return Guard(lambda where, part, exc: told.append((where, part, repr(exc)))), told


def test_an_error_switches_its_part_off_and_is_told_once():
    g, told = _guard()

    def boom() -> None:
        raise ValueError("bug")

    assert g.call("module-forward", boom) is None
    assert g.call("module-forward", boom) is None
    assert g.call("output-grad", lambda: 5) is None  # the same part: off
    assert g.call("optimizer-pre", lambda: 7) == 7  # another part: on
    assert told == [("module-forward", "activations", "ValueError('bug')")]
    assert g.errors == [("module-forward", "activations", "ValueError('bug')")]


def test_the_core_stopping_stops_every_measuring_part_but_not_the_writing():
    g, _ = _guard()
    g.call("backward", lambda: 1 / 0)
    assert not g.active("activations") and not g.active("tracer") and not g.active("core")
    assert g.active("store") and g.active("report") and g.active("exit")
    assert g.call("sink:store", lambda: "written") == "written"


def test_a_full_disk_stops_measuring_too():
    g, _ = _guard()

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    g.call("sink:store", full)
    assert not g.active("core") and not g.active("activations") and g.active("tensorboard")


def test_deliberate_and_base_exceptions_pass():
    g, told = _guard()

    class Stop(Deliberate):
        pass

    def stop() -> None:
        raise Stop("asked for")

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(Stop):
        g.call("optimizer-pre", stop)
    with pytest.raises(KeyboardInterrupt):
        g.call("optimizer-pre", interrupt)
    assert told == [] and g.active("core")


def test_a_reporter_that_raises_is_contained(capsys):
    def bad_report(where: str, part: str, exc: BaseException) -> None:
        raise RuntimeError("reporter bug")

    g = Guard(bad_report)
    assert g.call("flush", lambda: 1 / 0) is None
    assert "internal error in flush" in capsys.readouterr().err


def test_injected_faults_are_checked(monkeypatch):
    monkeypatch.setenv(guard.FAULTS_ENV, "module-forward,nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        guard.injected_faults()
    monkeypatch.setenv(guard.FAULTS_ENV, "module-forward")
    g, _ = _guard()
    with pytest.raises(InjectedFault):
        g.fault("module-forward")
    g.fault("backward")  # not injected: nothing


def test_nonfinite_steps_error_is_the_deliberate_one():
    assert issubclass(gradscope.NonfiniteStepsError, Deliberate)
    assert issubclass(gradscope.NonfiniteStepsError, RuntimeError)


# -- every entry point, in one process -------------------------------------------------------------
@pytest.fixture(scope="module")
def plain() -> tuple[list[str], dict[str, torch.Tensor]]:
    lines: list[str] = []
    _, model = every_entry.train(say=lines.append)
    return lines, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("entry", IN_PROCESS)
def test_a_fault_in_each_entry_point_leaves_training_as_it_was(
    entry, plain, out, monkeypatch, capsys
):
    monkeypatch.setenv(guard.FAULTS_ENV, entry)
    lines: list[str] = []

    def watch(model):
        return gradscope.watch(
            model,
            out=out,
            name="run",
            flush_every=2,
            activation_every=1,
            trace_nonfinite="always",
            report=entry == "report",
        )

    scope, model = every_entry.train(watch, say=lines.append)
    scope.close()
    assert lines == plain[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, plain[1][name]), name
    said = [line for line in capsys.readouterr().err.splitlines() if "internal error" in line]
    assert len(said) == 1 and f"in {entry}:" in said[0] and "InjectedFault" in said[0], said
    run = gradscope.load_run(scope.run_dir)
    if ENTRY_POINTS[entry] == "store":  # the record itself failed: nothing claims more
        return
    assert run.meta["status"] == "completed"
    errors = [e for e in run.events if e.get("event") == "internal_error"]
    assert [(e["where"], e["part"]) for e in errors] == [(entry, ENTRY_POINTS[entry])]
    assert (run.path / "findings.json").is_file()
    if entry == "report":  # the one stage that failed; `gradscope report RUN` can redo it
        assert not (run.path / "report.html").is_file()


def test_every_entry_point_is_passed_through(out):
    """The loop above really reaches every in-process entry point (so that injecting a fault
    there tests something): count the guard's calls per entry."""
    seen: set[str] = set()
    call, fault = Guard.call, Guard.fault

    def counting_call(self, entry, fn, *args, **kwargs):
        seen.add(entry)
        return call(self, entry, fn, *args, **kwargs)

    def counting_fault(self, entry):
        seen.add(entry)
        return fault(self, entry)

    Guard.call, Guard.fault = counting_call, counting_fault  # type: ignore[method-assign]
    try:
        from gradscope import hooks

        hook_call = hooks.Hook.__call__

        def counting_hook(self, *args, **kwargs):
            if self.guard is not None:
                seen.add(self.entry)
            return hook_call(self, *args, **kwargs)

        hooks.Hook.__call__ = counting_hook  # type: ignore[method-assign]
        scope, _ = every_entry.train(
            lambda m: gradscope.watch(
                m, out=out, flush_every=2, activation_every=1, trace_nonfinite="always"
            ),
            say=lambda line: None,
        )
        scope.close()
    finally:
        Guard.call, Guard.fault = call, fault  # type: ignore[method-assign]
        hooks.Hook.__call__ = hook_call  # type: ignore[method-assign]
    assert set(IN_PROCESS) <= seen, set(IN_PROCESS) - seen


# -- the entry points that need a process of their own ---------------------------------------------
def _run(args: list[str], fault: str | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(guard.FAULTS_ENV, None)
    if fault:
        env[guard.FAULTS_ENV] = fault
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def python_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("plain")
    return {
        mode: _run([sys.executable, str(SCRIPT), mode], None, cwd) for mode in ("plain", "sigterm")
    }


def _gradscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradscope", "run", *args]


@pytest.mark.slow
@pytest.mark.parametrize("fault", [None, "discover", "signal", "atexit"])
def test_entry_points_of_a_whole_process(fault, python_runs, tmp_path):
    if fault == "atexit":  # a watch() handle never closed
        got = _run(
            [sys.executable, str(SCRIPT), "watch-unclosed", str(tmp_path / "runs")], fault, tmp_path
        )
        want = python_runs["plain"]
    elif fault == "signal":  # SIGTERM in the middle: closed by gradscope run's handler
        got = _run(
            _gradscope("--out", str(tmp_path / "runs"), str(SCRIPT), "sigterm"), fault, tmp_path
        )
        want = python_runs["sigterm"]
    else:
        got = _run(_gradscope("--out", str(tmp_path / "runs"), str(SCRIPT)), fault, tmp_path)
        want = python_runs["plain"]
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
    said = [line for line in got.stderr.splitlines() if "internal error" in line]
    if fault is None:
        assert said == []
    else:
        assert len(said) == 1 and f"in {fault}:" in said[0], got.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    meta = gradscope.load_run(runs[0]).meta
    if fault in ("signal", "atexit"):
        assert meta["status"] == "running"  # the fault was in what closes the run
    elif fault == "discover":
        assert meta["steps"] == 0 and meta["status"] == "completed"  # nothing found
    else:
        assert meta["status"] == "completed" and meta["steps"] == 6


# -- a full disk -----------------------------------------------------------------------------------
def test_a_full_disk_stops_the_recording_not_the_training(plain, out, monkeypatch, capsys):
    """ENOSPC from the third flush on: the training ends as it would have, one line says the
    recording stopped, what was written before is intact, and close() raises nothing."""
    from gradscope.sinks import store

    writes = {"n": 0}
    real_write = store.Store.write

    def filling(self, table):
        writes["n"] += 1
        if writes["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_dir))
        return real_write(self, table)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.Store, "write", filling)
    lines: list[str] = []
    scope, model = every_entry.train(
        lambda m: gradscope.watch(m, out=out, name="run", flush_every=1, quiet=True),
        say=lines.append,
    )
    # the disk stays full for everything the end writes
    monkeypatch.setattr(store.Store, "event", full)
    monkeypatch.setattr(store.Store, "write_findings", full)
    monkeypatch.setattr(gradscope.rundir, "write_json", full)
    scope.close()  # raises nothing
    assert lines == plain[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, plain[1][name]), name
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if "stopped recording" in line]
    assert len(said) == 1 and "No space left on device" in said[0], err
    assert len(err) == 1  # quiet: nothing else
    monkeypatch.undo()
    run = gradscope.load_run(scope.run_dir)
    assert sorted(run.metrics["step"].unique().tolist()) == [0, 1]  # the two flushes written
    assert not list((scope.run_dir / "metrics").glob(".*.tmp"))


def test_a_full_disk_under_gradscope_run_exits_as_python_does(tmp_path):
    """The issue's trial: ``--out`` on a full filesystem; gradscope run must exit 0 with the
    script's output, as python does. The disk fills up once the run directory exists
    (simulated by a sitecustomize that makes every write into it fail after run.json's
    first)."""
    hook = tmp_path / "site"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, gradscope.sinks.store as s, gradscope.rundir as r\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "s.Store.write = s.Store.event = s.Store.write_findings = full\n"
        "_write_json = r.write_json\n"
        "def write_json(*a, **k):\n"
        "    r.write_json = full\n"
        "    return _write_json(*a, **k)\n"
        "r.write_json = write_json\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])}
    env.pop(guard.FAULTS_ENV, None)
    plain = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    got = subprocess.run(
        [sys.executable, "-m", "gradscope", "run", "--out", str(tmp_path / "runs"), str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (got.returncode, got.stdout) == (plain.returncode, plain.stdout) == (0, plain.stdout)
    assert "Traceback" not in got.stderr
    said = [line for line in got.stderr.splitlines() if "stopped recording" in line]
    assert len(said) == 1, got.stderr


# -- the guard remedy stopping a run: one line -----------------------------------------------------
@pytest.mark.slow
def test_the_guard_stopping_a_run_says_why_in_one_line(tmp_path):
    script = Path(__file__).parent / "scripts" / "nan_every_step.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(guard.FAULTS_ENV, None)
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--out",
            str(tmp_path),
            "--name",
            "run",
            "--guard",
            "--guard-limit",
            "3",
            "-q",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert got.returncode == 1
    printed = got.stdout.splitlines()
    assert printed == [f"step {i}" for i in range(len(printed))] and 2 <= len(printed) <= 4
    lines = got.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("gradscope guard: ")
        and "Traceback" not in got.stderr
    ), got.stderr
    assert "3" in lines[0] and "non-finite" in lines[0]
    run = gradscope.load_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["exit_code"] == 1
    assert (tmp_path / "run" / "findings.json").is_file()
