"""The terminal summary: its numbers against hand calculations, NaN shown as NaN (never 0 or
"-"), stacked blocks when a table does not fit the width, and text from the run printed as
text (never as rich markup)."""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope.load import Progress, Run
from gradscope.sinks.console import layer_rows, print_findings, print_summary


def _console(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, color_system=None, legacy_windows=False), buf


def _squash(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """NaN inputs at 47 of 80 steps (never more than 3 in a row), skipped by guard=True: the
    gradients (and the backward signal, and the activations) are NaN at exactly those
    steps, finite at the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("console")
    with gradscope.watch(
        model,
        opt,
        out=out,
        name="nan",
        quiet=True,
        guard=True,
        activation_every=1,
        update_every=1,
        flush_every=20,
        report=False,
    ) as scope:
        for step in range(80):
            x = torch.randn(16, 6, generator=gen)
            if step in NAN_STEPS:
                x[0, 0] = float("nan")
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    return scope.run_dir


NAN_STEPS = {i for i in range(77) if i % 5 < 3}
assert len(NAN_STEPS) == 47


def _oracle(run: Run) -> dict[str, dict[str, float | None]]:
    """The summary's numbers by hand, one module at a time, in plain Python: the module's
    norm per step from its parameters' norms, medians over the finite steps."""
    m = run.metrics
    out: dict[str, dict[str, float | None]] = {}
    for entry in run.meta["layers"]:
        if entry["kind"] != "module":
            continue
        name = entry["name"]
        params = [
            e["name"] for e in run.meta["layers"] if e["kind"] == "param" and e["module"] == name
        ]
        per_step: dict[int, float] = {}
        for p in params:
            rows = m[(m["layer"] == p) & (m["metric"] == "grad_norm")]
            for step, value in zip(rows["step"], rows["value"]):
                per_step[step] = per_step.get(step, 0.0) + value**2
        finite = [math.sqrt(v) for v in per_step.values() if math.isfinite(v)]
        ratios = []
        for p in params:
            rows = m[(m["layer"] == p) & (m["metric"] == "update_ratio")]["value"]
            vals = [v for v in rows if math.isfinite(v)]
            if vals:
                ratios.append(statistics.median(vals))
        og = m[(m["layer"] == name) & (m["metric"] == "output_grad_norm")]["value"]
        counts = m[m["layer"].isin(params) & (m["metric"] == "grad_nonfinite")]["value"]
        out[name] = {
            "grad_finite_median": statistics.median(finite) if finite else None,
            "grad_steps": len(per_step),
            "grad_nan_steps": sum(1 for v in per_step.values() if math.isnan(v)),
            "update_ratio": sorted(ratios)[len(ratios) // 2] if ratios else None,
            "out_grad_finite_median": statistics.median([v for v in og if math.isfinite(v)])
            if len(og)
            else None,
            "out_grad_nan": sum(1 for v in og if math.isnan(v)),
            "nonfinite": float(sum(counts)) if params else None,
        }
    return out


def test_layer_rows_are_the_hand_calculation(tmp_path):
    """A clean run: every number equals the oracle (vectorised code, looped oracle)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with gradscope.watch(
        model, opt, out=tmp_path, quiet=True, activation_every=2, update_every=3, report=False
    ) as scope:
        for _ in range(15):
            opt.zero_grad()
            model(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step()
    run = gradscope.load_run(scope.run_dir)
    oracle = _oracle(run)
    rows = {r["layer"]: r for r in layer_rows(run)}
    assert list(rows) == ["0", "1", "2", "3", "4"]
    m = run.metrics
    for name, row in rows.items():
        want = oracle[name]
        assert row["bad"] == {}
        assert (
            row["grad_norm"] == pytest.approx(want["grad_finite_median"], rel=1e-12)
            if want["grad_finite_median"] is not None
            else row["grad_norm"] is None
        )
        assert (
            row["update_ratio"] == pytest.approx(want["update_ratio"], rel=1e-12)
            if want["update_ratio"] is not None
            else row["update_ratio"] is None
        )
        assert row["output_grad"] == pytest.approx(want["out_grad_finite_median"], rel=1e-12)
        assert row["nonfinite"] == want["nonfinite"]
        for metric, key in (("act_dead_fraction", "dead"), ("act_saturation", "saturated")):
            rows_m = m[(m["layer"] == name) & (m["metric"] == metric)].sort_values("step")
            expect = float(rows_m["value"].iloc[-1]) if len(rows_m) else None
            assert row[key] == expect, (name, key)
    assert rows["1"]["dead"] is not None and rows["3"]["saturated"] is not None


def test_nan_gradients_read_as_nan_never_as_0(nan_run):
    run = gradscope.load_run(nan_run)
    oracle = _oracle(run)
    rows = {r["layer"]: r for r in layer_rows(run)}
    for name in ("0", "2"):
        want, row = oracle[name], rows[name]
        assert (want["grad_nan_steps"], want["grad_steps"]) == (47, 80)
        assert math.isnan(row["grad_norm"]) and row["bad"]["grad_norm"] == (47, 80)
        assert want["grad_finite_median"] > 0  # what a "finite median" would have said
        assert math.isnan(row["output_grad"]) and row["bad"]["output_grad"] == (47, 80)
        assert row["nonfinite"] == want["nonfinite"] > 0
        assert math.isnan(row["update_ratio"]) or row["update_ratio"] > 0
    # the summary: nan 47/80, never 0 and never "-"
    console, buf = _console(160)
    print_summary(run, console)
    text = buf.getvalue()
    lines = {line.split("│")[0].strip(): line for line in text.splitlines() if "│" in line}
    for name in ("0", "2"):
        cells = [c.strip() for c in lines[name].split("│")]
        assert cells[2] == "nan 47/80" and cells[5] == "nan 47/80", cells
    assert _squash("nan N/M: N of its M values were NaN/Inf") in _squash(text)


def test_dead_and_saturated_fractions_of_nan_outputs_are_nan(tmp_path):
    """The last sample of a tanh whose output was NaN: recorded as NaN (the probe knows the
    output was garbage: act_nonfinite), shown as nan."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(
        model, opt, out=tmp_path, quiet=True, activation_every=1, report=False
    ) as scope:
        for step in range(6):
            if step == 3:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
    run = gradscope.load_run(scope.run_dir)
    assert math.isnan(run.wide("act_saturation")["1"].iloc[-1])  # as recorded
    (tanh,) = [r for r in layer_rows(run) if r["layer"] == "1"]
    assert math.isnan(tanh["saturated"])
    console, buf = _console(160)
    print_summary(run, console)
    line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("1 "))
    assert line.split("│")[-1].strip() == "nan"


LONG = "blocks.0._orig_mod.attention.query_keyvalue"  # 43 characters
assert len(LONG) == 43


def _synthetic(names: list[str], findings: list[dict]) -> Run:
    layers = []
    rows = []
    for name in names:
        layers.append({"name": name, "kind": "module", "type": "Linear"})
        layers.append({"name": f"{name}.weight", "kind": "param", "module": name, "type": "Linear"})
        for step in range(3):
            rows.append((step, f"{name}.weight", "param", "grad_norm", 0.5 + step))
    metrics = pd.DataFrame(rows, columns=["step", "layer", "kind", "metric", "value"])
    meta = {"status": "completed", "steps": 3, "torch": "2.x", "layers": layers}
    return Run(
        Path("/runs/a-run-with-a-rather-long-directory-name"),
        meta,
        metrics,
        findings=findings,
        progress=Progress("completed", "", 3, 3, 3),
    )


FINDINGS = [
    {
        "kind": "exploding_gradients",
        "severity": "error",
        "layer": LONG + ".weight",
        "first_step": 12,
        "last_step": 40,
        "message": "the gradient norm of " + LONG + ".weight grew 312x above its trailing median "
        "within 3 steps, and kept growing while the loss went up",
        "suggestion": "lower the learning rate; clip gradients: gradscope.watch(..., "
        "clip='zclip') or clip='norm:2.5' (= torch.nn.utils.clip_grad_norm_("
        "model.parameters(), max_norm=2.5)); add warm-up",
    },
    {
        "kind": "dead_units",
        "severity": "warning",
        "layer": "[/]odd[bold red]name",
        "first_step": 3,
        "last_step": 3,
        "message": "[red]85%[/red] of the units are dead",
        "suggestion": "swap it: [link=x]here[/link]",
    },
]


@pytest.mark.parametrize("width", [80, 40])
def test_findings_too_wide_for_the_terminal_are_stacked(width):
    console, buf = _console(width)
    print_findings(FINDINGS, console)
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert len(lines) < 40  # not 258 lines of a 2-character column
    flat = _squash(text)
    for f in FINDINGS:  # every word of every finding, in full, in order
        for field in ("severity", "kind", "layer", "message", "suggestion"):
            assert _squash(f[field]) in flat, (field, f[field])
    assert "┃" not in text  # the stacked layout, not a table
    assert flat.index("exploding_gradients") < flat.index("dead_units")  # errors first


def test_findings_that_fit_are_a_table():
    console, buf = _console(200)
    print_findings(FINDINGS, console)
    text = buf.getvalue()
    assert "┃" in text and max(len(line) for line in text.splitlines()) <= 200
    assert "[/]odd[bold red]name" in text and "[red]85%[/red]" in text  # not markup


@pytest.mark.parametrize("width", [80, 40])
def test_the_summary_fits_any_width(width):
    run = _synthetic([LONG, "head", "[/]odd[bold red]name"], FINDINGS)
    console, buf = _console(width)
    print_summary(run, console)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    flat = _squash(text)
    for name in (LONG, "head", "[/]odd[bold red]name"):
        assert _squash(f"{name} (Linear)") in flat  # a block per layer
    assert "gradnorm1.5" in flat  # median of 0.5, 1.5, 2.5
    for f in FINDINGS:
        assert _squash(f["message"]) in flat and _squash(f["suggestion"]) in flat


def test_the_summary_is_a_table_where_it_fits():
    run = _synthetic([LONG, "head"], FINDINGS[:1])
    console, buf = _console(200)
    print_summary(run, console)
    text = buf.getvalue()
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert "grad norm" in header and "┃" in header
    row = next(line for line in text.splitlines() if line.startswith(LONG))
    assert [c.strip() for c in row.split("│")][:3] == [LONG, "Linear", "1.5"]
