"""Hooks are global state: counted before, inside and after; nested; after an exception."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradscope

from conftest import hook_counts
from models import batch, mlp, train


def test_hooks_before_inside_after(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    with gradscope.watch(model, out=out) as scope:
        inside = hook_counts(model)
        assert inside != before
        assert len(scope.parts.hooks) > 0
        train(model, opt, 3)
    assert hook_counts(model) == before
    assert len(scope.parts.hooks) == 0


def test_nested_scopes_remove_only_their_own(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    with gradscope.watch(model, out=out, name="outer") as outer:
        train(model, opt, 1)  # step 1 is not sampled: the outer's per-module hooks are parked
        one = hook_counts(model)
        with gradscope.watch(model, opt, out=out, name="inner") as inner:
            train(model, opt, 2)
        assert hook_counts(model) == one
        train(model, opt, 1)
    assert hook_counts(model) == before
    assert inner.steps == 2 and outer.steps == 4


def test_exception_inside_loop_removes_hooks_and_marks_failed(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), gradscope.watch(model, out=out) as scope:
        train(model, opt, 2)
        raise RuntimeError("boom")
    assert hook_counts(model) == before
    run = gradscope.load_run(scope.run_dir)
    assert run.meta["status"] == "failed" and run.meta["steps"] == 2
    assert run.findings == [] and len(run.wide("grad_norm")) == 2


def test_keyboard_interrupt_marks_interrupted(out):
    model = mlp()
    with pytest.raises(KeyboardInterrupt), gradscope.watch(model, out=out) as scope:
        raise KeyboardInterrupt
    assert gradscope.load_run(scope.run_dir).meta["status"] == "interrupted"


def test_close_is_idempotent_and_handle_style_works(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, out=out)
    train(model, opt, 2)
    scope.close()
    scope.close()
    assert scope.closed and scope.steps == 2
    with pytest.raises(RuntimeError, match="closed"):
        scope.flush()


def test_users_hooks_still_fire_and_see_the_same_values(out):
    def run(watched):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = []
        model[1].register_forward_hook(lambda m, a, o: seen.append(o.sum().item()))
        model[0].weight.register_hook(lambda g: seen.append(g.norm().item()))
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
        if watched:
            with gradscope.watch(model, out=out):
                train(model, opt, 3)
        else:
            train(model, opt, 3)
        return seen

    assert run(True) == run(False)


def test_torch_save_and_deepcopy_of_a_watched_model(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out):
        train(model, opt, 1)
        buf = io.BytesIO()
        torch.save(model, buf)
        twin = copy.deepcopy(model)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), model(x)) and torch.equal(twin(x), model(x))
    for m in (loaded, twin):  # the copies carry inert placeholders, nothing of the scope
        hooks = [h for mod in m.modules() for h in mod._forward_hooks.values()]
        assert all(type(h).__name__ == "InertHook" for h in hooks)


@pytest.mark.slow  # 2,000 steps: the longest in-process test (~5-10 s each)
@pytest.mark.parametrize("trace", ["auto", "always"])
def test_no_tensor_outlives_its_step(out, trace):
    """Memory stays flat: the number of live tensors does not grow over 2,000 steps (also with
    the non-finite tracer checking every module every step).

    Both counts are taken right after a flush, when the step buffer is empty: flushes go by
    steps only (``flush_secs`` out of reach). With the default time-based flush (10 s), a
    machine under load flushes at some other step too, the step-based schedule shifts, and a
    count would include the up to 49 buffered rows' tensors (measured: 20 -> 177 live tensors,
    the same run with ``flush_secs=0.05``)."""
    import gc

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    with gradscope.watch(
        model,
        out=out,
        flush_every=50,
        flush_secs=1e9,
        activation_every=5,
        tensorboard=False,
        trace_nonfinite=trace,
    ) as scope:
        counts = []
        for i in range(2000):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i in (199, 1999):  # both right after a flush
                counts.append(live_tensors())
    assert counts[1] <= counts[0], counts
    assert scope.steps == 2000


def test_interpreter_exit_closes_an_unclosed_scope(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, gradscope
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scope = gradscope.watch(model, out={str(tmp_path)!r}, name="r")
        for _ in range(3):
            opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
        if __import__("sys").argv[1] == "crash":
            raise ValueError("user code failed")
        """
    )
    for mode, status, code in (("ok", "completed", 0), ("crash", "failed", 1)):
        proc = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == code, proc.stderr
        run = gradscope.load_run(sorted(tmp_path.glob("r*"))[-1])
        assert run.meta["status"] == status and run.meta["steps"] == 3
        assert (run.path / "findings.json").exists()


def test_backward_passes_that_never_step_stay_bounded(out):
    """Input-gradient loops (saliency, adversarial examples) call backward() without ever
    updating the weights: one open step, whose bookkeeping must not grow."""
    import gc

    model = mlp()
    x, y = batch()
    with gradscope.watch(model, out=out, tensorboard=False) as scope:
        counts = []
        for i in range(600):
            xi = x.clone().requires_grad_(True)
            nn.functional.cross_entropy(model(xi), y).backward()
            if i in (99, 599):
                gc.collect()
                counts.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)))
    assert counts[1] <= counts[0] + 5, counts
    assert scope.steps == 1  # never updated: one (accumulating) step, closed at the end


def test_an_internal_error_never_stops_training(out, monkeypatch, capsys):
    from gradscope.probes.grads import GradProbe

    def broken(*args, **kwargs):
        raise RuntimeError("probe bug")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out) as scope:
        train(model, opt, 2)
        monkeypatch.setattr(GradProbe, "record", broken)
        train(model, opt, 3)  # training goes on
    run = scope.load()
    assert run.meta["steps"] == 2 and run.meta["status"] == "completed"
    assert [e["event"] for e in run.events] == ["internal_error"]
    assert "probe bug" in run.events[0]["error"]
    assert run.events[0]["where"] == "optimizer-pre" and run.events[0]["part"] == "core"
    said = [line for line in capsys.readouterr().err.splitlines() if "internal error" in line]
    assert len(said) == 1  # one line, once, though every later step would fail again
    assert "probe bug" in said[0] and "training continues" in said[0]


def test_flush_in_the_middle_of_a_step_keeps_the_step(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out) as scope:
        train(model, opt, 2)
        x, y = batch(seed=9)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        scope.flush()  # step 2 is still open: its loss stays buffered
        assert len(scope.load().wide("grad_norm")) == 2
        opt.step()
    run = scope.load()
    assert list(run.wide("loss").index) == [0, 1, 2] and run.meta["steps"] == 3
