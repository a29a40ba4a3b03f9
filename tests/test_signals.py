"""A signal in the middle of a flush loses no record: rows leave the buffer only once every sink
has written them, and the run directory says how the run ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope

SCRIPT = Path(__file__).parent / "scripts" / "signal_in_flush.py"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("at_call", [1, 3])  # the first flush; the last (steps 40-59)
def test_a_signal_inside_a_flush_loses_no_row(sig, at_call, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
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
            "--flush-every",
            "20",
            "--no-report",
            str(SCRIPT),
            sig,
            str(at_call),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    number = getattr(signal, sig)
    assert got.returncode == -number, got.stderr  # it died by the signal, as python would
    run = gradscope.load_run(tmp_path / "run")
    steps = sorted(run.metrics["step"].unique().tolist())
    flushed = 20 * at_call  # every step trained before the signal is on disk
    assert steps == list(range(flushed)), (steps[:3], steps[-3:])
    assert run.meta["status"] == "interrupted"
    for metric in ("grad_norm", "loss"):
        assert list(run.wide(metric).index) == list(range(flushed))
    assert not list((tmp_path / "run" / "metrics").glob(".*.tmp"))
    assert (tmp_path / "run" / "tb").is_dir()
    loss = run.wide("loss")["(run)"]
    assert loss.notna().all()
