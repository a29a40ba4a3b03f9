"""The non-finite tracer: the module that made the first NaN/Inf, forward and backward."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import gradscope
from gradscope.probes.nonfinite import NonfiniteTracer

from conftest import hook_counts
from models import cpu_scaler


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


class Residual(nn.Module):
    """A container whose own forward holds a functional op between its children."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return torch.log(self.inner(x) - self.inner(x).detach())  # log(0) = -inf here


def _run(model, steps, make_x, out, guard=False, lr=0.01, **options):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gradscope.watch(model, out=out, **{"quiet": True, **options}) as scope:
        for i in range(steps):
            opt.zero_grad()
            loss = model(make_x(i)).pow(2).mean()
            loss.backward()
            grads_ok = all(
                torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
            )
            if grads_ok or not guard:
                opt.step()
    return scope


def _nonfinite(scope):
    found = [f for f in scope.findings if f["kind"] == "nonfinite"]
    assert len(found) == 1, scope.findings
    return found[0]


def _x_with_zero_row(step_bad):
    def make(i):
        x = torch.rand(8, 4) + 0.5
        if i >= step_bad:
            x[0] = 0.0
        return x

    return make


@pytest.mark.parametrize("immediate", [True, False])
def test_forward_nan_is_blamed_on_the_module_that_made_it(out, immediate, monkeypatch):
    """log(0) in a custom module: the culprit is that module (anomaly mode blames the Linear
    after it: docs/comparison.md, "Where a NaN/Inf was made"), with finite inputs, at the right
    step. ``immediate=False`` is the accelerator path (flags kept on the device, read once per
    step)."""
    if not immediate:
        monkeypatch.setattr(NonfiniteTracer, "__init__", _deferred_init)
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()
    scope = _run(model, 12, _x_with_zero_row(5), out, trace_nonfinite="always")
    f = _nonfinite(scope)
    assert (f["phase"], f["layer"], f["module"], f["class"], f["first_step"]) == (
        "forward",
        "2",
        "2",
        "Log",
        5,
    )
    assert f["evidence"]["traced"] is True and f["evidence"]["inputs_finite"] is True
    if immediate:
        assert f["evidence"]["input_max_abs"] == pytest.approx(1.5, abs=0.01)
        assert f["evidence"]["output"]["inf"] + f["evidence"]["output"]["nan"] > 0


def _deferred_init(self, models, mode, immediate, report, step, **kwargs):
    _orig_init(self, models, mode, False, report, step, **kwargs)


_orig_init = NonfiniteTracer.__init__


def test_functional_op_inside_a_container_is_blamed_on_the_container(out):
    model = nn.Sequential(nn.Linear(4, 4), Residual(), nn.Linear(4, 1))
    scope = _run(model, 3, lambda i: torch.rand(8, 4), out, trace_nonfinite="always")
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["class"], f["first_step"]) == ("forward", "1", "Residual", 0)


def test_nan_in_the_data_is_not_blamed_on_a_module(out):
    def make(i):
        x = torch.rand(8, 4)
        if i == 3:
            x[2, 1] = float("nan")
        return x

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    scope = _run(model, 6, make, out, trace_nonfinite="always", guard=True)
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["first_step"]) == ("data", None, 3)
    assert "data" in f["evidence"]["note"]


def test_inf_only_backward_blow_up_is_found(out):
    """sqrt'(0) = inf: the forward is finite, the gradient is Inf (not NaN), which anomaly mode
    does not flag. The culprit is the Sqrt module: the gradient at its output was finite."""
    model = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()

    def make(i):
        if i == 4:  # unit 0 of the first layer outputs exactly 0 for every (positive) input
            with torch.no_grad():
                model[0].weight[0] = 0.0
                model[0].bias[0] = 0.0
        return torch.rand(8, 4) + 0.5

    # detect_anomaly (the tool users reach for) raises nothing on this step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Anomaly Detection has been enabled"
        anomaly = torch.autograd.detect_anomaly()
    with anomaly:
        probe = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 1))
        probe.load_state_dict(model.state_dict())
        with torch.no_grad():
            probe[0].weight[0] = 0.0
            probe[0].bias[0] = 0.0
        probe(torch.rand(8, 4) + 0.5).pow(2).mean().backward()
    assert not torch.isfinite(probe[0].weight.grad).all()
    assert not torch.isnan(probe[0].weight.grad).any()  # Inf only: invisible to anomaly mode

    scope = _run(model, 8, make, out, trace_nonfinite="always", guard=True)
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["class"], f["first_step"]) == ("backward", "1", "Sqrt", 4)
    assert f["evidence"]["output_grads_finite"] is True
    assert f["evidence"]["input_grad"]["inf"] > 0


def test_gradient_made_non_finite_by_the_loss_is_outside_any_module(out):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, out=out, quiet=True, trace_nonfinite="always") as scope:
        for _ in range(2):
            opt.zero_grad()
            y = model(torch.rand(8, 4))
            loss = torch.sqrt((y - y.detach()).pow(2)).sum()  # sqrt at 0: inf gradient
            loss.backward()
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["layer"]) == ("backward", None, "1")
    assert "outside any module" in f["evidence"]["note"]


def test_auto_mode_replays_the_flagged_step_and_names_the_module_on_it(out):
    """Default mode on the CPU: no tracing cost until a non-finite gradient is seen, before the
    optimizer step; that step's forward is replayed with the tracer armed, so the module is
    named on the step it happened, though it never recurs (the weights are poisoned)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()

    def make(i):
        x = torch.rand(8, 4) + 0.5
        if i == 5:
            x[0] = 0.0
        return x

    scope = _run(model, 10, make, out)  # no guard: the NaN step poisons the weights
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["class"], f["first_step"]) == ("forward", "2", "Log", 5)
    assert f["evidence"]["traced_at_step"] == 5 and f["evidence"]["attributed"] == "replayed"
    assert "Log" in f["message"] and "step 5" in f["message"]


def test_auto_mode_off_the_cpu_arms_on_the_first_hit_and_names_the_module_when_it_recurs(
    out, monkeypatch
):
    """Where the flag is not read before the optimizer step (accelerators: here the deferred
    path on the CPU), the first hit arms the tracer, which names the module the next time it
    happens (here the weights stay clean: the loop skips non-finite steps, as many training
    scripts do)."""
    monkeypatch.setattr(NonfiniteTracer, "__init__", _deferred_init)
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()

    def make(i):
        x = torch.rand(8, 4) + 0.5
        if i in (5, 9):
            x[0] = 0.0
        return x

    scope = _run(model, 12, make, out, guard=True)
    f = _nonfinite(scope)
    assert f["first_step"] == 5
    assert (f["phase"], f["module"], f["class"]) == ("forward", "2", "Log")
    assert f["evidence"]["traced_at_step"] > 5  # traced at the second occurrence
    assert f["evidence"]["attributed"] == "traced"
    events = [
        json.loads(line) for line in (scope.run_dir / "events.jsonl").read_text().splitlines()
    ]
    kinds = [e["event"] for e in events]
    assert "nonfinite_traced" in kinds and "finding" in kinds


def test_auto_mode_without_recurrence_off_the_cpu_infers_the_phase_and_says_how_to_trace(
    out, monkeypatch
):
    monkeypatch.setattr(NonfiniteTracer, "__init__", _deferred_init)
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()

    def make(i):
        x = torch.rand(8, 4) + 0.5
        if i == 5:
            x[0] = 0.0
        return x

    scope = _run(model, 10, make, out)  # no guard: the NaN step poisons the weights
    f = _nonfinite(scope)
    assert (f["phase"], f["first_step"], f["last_step"]) == ("forward", 5, 9)
    assert "trace_nonfinite='always'" in f["suggestion"]


def test_weights_made_non_finite_by_the_optimizer(out):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, out=out, quiet=True, trace_nonfinite="always") as scope:
        for i in range(4):
            opt.zero_grad()
            model(torch.rand(8, 4)).pow(2).mean().backward()
            if i == 1:
                opt.param_groups[0]["lr"] = float("inf")  # finite gradients, infinite step
            opt.step()
    f = _nonfinite(scope)
    assert (f["phase"], f["module"], f["first_step"]) == ("optimizer", "0", 2)
    assert f["evidence"]["nonfinite_params"]


def test_tracer_hooks_come_off_when_done_and_at_close(out):
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()
    before = hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    make = _x_with_zero_row(2)
    with gradscope.watch(model, out=out, quiet=True, trace_nonfinite="always") as scope:
        armed = hook_counts(model)
        assert all(armed[n][0] >= before[n][0] + 1 for n in armed)  # every module traced
        for i in range(4):
            opt.zero_grad()
            model(make(i)).pow(2).mean().backward()
        assert scope.parts.tracer.done and not scope.parts.tracer.armed
        assert hook_counts(model)["1"] == before["1"]  # Identity: only the tracer hooked it
    assert hook_counts(model) == before


def test_no_findings_printed_when_quiet_and_a_line_when_not(out, capfd):
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()
    _run(model, 4, _x_with_zero_row(1), out, trace_nonfinite="always", quiet=False)
    err = capfd.readouterr().err
    assert "gradscope: error: nonfinite at 2, step 1" in err
    assert "1 finding(s), 1 error(s)" in err  # the end-of-run summary


def test_gradscaler_calibrating_its_scale_is_not_a_finding(out):
    """Mixed precision: the first steps overflow at a too-high loss scale and GradScaler skips
    them (weights untouched, scale halved). That is the scaler working, not a pathology: no
    finding, and the tracer stays off. (Inputs x10 at lr 1e-3: with inputs x100 at lr 1e-2
    this model also diverges once the scale settles, updates 27x the weights, which is rightly
    a finding.)"""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    scaler = cpu_scaler(init_scale=2.0**127)
    with gradscope.watch(model, out=out, quiet=True, trace_nonfinite="auto") as scope:
        for _ in range(30):
            opt.zero_grad()
            scaler.scale(model(torch.rand(16, 4) * 10).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        assert not scope.parts.tracer.armed
    run = scope.load()
    skipped = run.wide("skipped_step", "run")
    assert skipped.to_numpy().sum() >= 1  # the scaler did skip
    assert scope.findings == []


def test_auto_tracer_gives_up_when_the_problem_does_not_recur(out, monkeypatch):
    from gradscope.probes import nonfinite as tracer_module

    monkeypatch.setattr(tracer_module, "ARMED_STEPS", 5)
    monkeypatch.setattr(NonfiniteTracer, "__init__", _deferred_init)  # no replay: armed
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), Log(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).repeat(2, 1))
        model[0].bias.zero_()

    def make(i):
        x = torch.rand(8, 4) + 0.5
        if i == 3:
            x[0] = 0.0
        return x

    before = hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, out=out, quiet=True) as scope:
        for i in range(15):
            opt.zero_grad()
            loss = model(make(i)).pow(2).mean()
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
        assert not scope.parts.tracer.armed and not scope.parts.tracer.done
        assert hook_counts(model)["1"] == before["1"]  # the tracer's hooks came off
    assert _nonfinite(scope)["first_step"] == 3


def test_an_fp16_overflow_names_the_module_whose_output_left_the_range(out):
    """Under float16 autocast a layer whose outputs exceed 65504 produces inf from finite
    inputs; GradScaler then skips every step. The finding names that layer and says why."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.big, self.head = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 1)

        def forward(self, x):
            return self.head(torch.relu(self.big(torch.relu(self.a(x)))))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = cpu_scaler()
    with gradscope.watch(model, out=out, quiet=True, trace_nonfinite="always") as scope:
        for i in range(8):
            if i == 5:
                with torch.no_grad():
                    model.big.weight.mul_(1e5)  # its outputs now exceed float16's range
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(torch.randn(16, 8)).float().pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (f,) = [f for f in scope.findings if f["kind"] == "nonfinite"]
    assert (f["module"], f["phase"], f["first_step"]) == ("big", "forward", 5)
    assert f["evidence"]["fp16_overflow"] is True and f["evidence"]["output_dtype"] == "float16"
    assert "left the float16 range" in f["message"] and "bfloat16" in f["suggestion"]
