"""Findings reach the user: stderr once, events.jsonl at once, findings.json and a table at the
end, also when training raises, is interrupted or the interpreter exits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradscope
from gradscope.sinks.console import FindingPrinter

from models import mostly_dead_linear


def _dead_run(out, steps=40, **options):
    """A layer built with exactly 6 of its 8 units dead: a dead_units finding from step 0."""
    model = mostly_dead_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(64, model[0].in_features)
    scope = gradscope.watch(model, out=out, activation_every=1, **options)
    return model, opt, x, scope


def _steps(model, opt, x, n):
    for _ in range(n):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


def test_mostly_dead_layer_is_one_finding_written_everywhere(out, capfd):
    model, opt, x, scope = _dead_run(out)
    with scope:
        _steps(model, opt, x, 30)
    f = scope.findings
    assert [(d["kind"], d["first_step"], d["last_step"]) for d in f] == [("dead_units", 0, 29)]
    assert f[0]["evidence"]["dead_fraction"] == 0.75 and f[0]["evidence"]["born_dead"] is True
    run = gradscope.load_run(scope.run_dir)
    assert run.findings == f
    events = [e for e in run.events if e["event"] == "finding"]
    assert len(events) == 1 and events[0]["kind"] == "dead_units"
    err = capfd.readouterr().err
    assert err.count("gradscope: warning: dead_units") == 1  # announced once, not per step
    assert "1 finding(s), 0 error(s) in 30 steps" in err


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_findings_survive_an_exception_and_ctrl_c(out, exc):
    model, opt, x, scope = _dead_run(out, quiet=True)
    with pytest.raises(type(exc)), scope:
        _steps(model, opt, x, 12)
        raise exc
    run = gradscope.load_run(scope.run_dir)
    assert run.meta["status"] in ("failed", "interrupted")
    assert [d["kind"] for d in run.findings] == ["dead_units"]


def test_findings_written_when_the_interpreter_exits_after_a_crash(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, gradscope
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            model[0].bias.fill_(-100.0)  # every unit dead for inputs in [0, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scope = gradscope.watch(model, out={str(tmp_path)!r}, name="r", activation_every=1)
        for _ in range(12):
            opt.zero_grad(); model(torch.rand(32, 4)).sum().backward(); opt.step()
        raise ValueError("user code failed")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 1 and "ValueError: user code failed" in proc.stderr
    assert "dead_units" in proc.stderr  # the end-of-run table
    findings = json.loads((tmp_path / "r" / "findings.json").read_text())
    assert [(f["kind"], f["layer"], f["severity"]) for f in findings] == [
        ("dead_units", "1", "error")
    ]


def test_quiet_prints_nothing_and_diagnose_off_finds_nothing(out, capfd):
    model, opt, x, scope = _dead_run(out, quiet=True)
    with scope:
        _steps(model, opt, x, 12)
    assert scope.findings and capfd.readouterr().err == ""
    model, opt, x, scope = _dead_run(out, diagnose=False, quiet=True)
    with scope:
        _steps(model, opt, x, 12)
    assert scope.findings == [] and gradscope.load_run(scope.run_dir).findings == []


def test_thresholds_are_options(out):
    model, opt, x, scope = _dead_run(out, quiet=True, thresholds={"dead_fraction": 0.8})
    with scope:
        _steps(model, opt, x, 12)
    assert scope.findings == []  # three quarters dead is below the user's 80%


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"trace_nonfinite": "sometimes"},
            "trace_nonfinite='sometimes': expected one of auto, always, off",
        ),
        (
            {"thresholds": {"dead_fracion": 0.5}},
            "thresholds: unknown name 'dead_fracion' (did you mean 'dead_fraction'?)",
        ),
        ({"thresholds": {"patience": 0}}, "thresholds: patience=0: expected an integer >= 1"),
        ({"thresholds": 3}, "thresholds=3: expected a dict of overrides"),
        ({"quiet": "yes"}, "quiet='yes': expected True or False"),
    ],
)
def test_bad_diagnosis_options_fail_in_one_line(out, options, message):
    with pytest.raises((TypeError, ValueError)) as info:
        gradscope.watch(nn.Linear(2, 2), out=out, **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_printer_is_rate_limited(capsys):
    printer = FindingPrinter(burst=2, window=60.0)
    finding = {
        "kind": "dead_units",
        "severity": "warning",
        "layer": "a",
        "first_step": 0,
        "last_step": 9,
        "message": "m",
        "suggestion": "s",
    }
    for _ in range(5):
        printer.announce(finding, True)
    assert capsys.readouterr().err.count("gradscope: warning") == 2
    assert printer.suppressed == 3
    printer.summary([finding], 10, "run", "completed")
    assert "(3 not printed as they came)" in capsys.readouterr().err
