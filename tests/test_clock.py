"""The step clock on its own: a fake recorder logs what the clock asks of it.

Each test drives :class:`gradscope.clock.Clock` through its public methods in the order torch
calls them (``before_backward``/``after_backward`` around a backward pass, ``optimizer_pre``/
``optimizer_post`` around ``optimizer.step()``, GradScaler's ``scaler_step``/``scaler_skipped``,
``manual_step`` for ``Scope.step()``, ``finish`` at close) and compares the exact sequence of
recorder calls with one written out by hand from the rules of the clock's module docstring.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.clock import Clock
from gradscope.layers import LayerTable

ALL = ("weight", "bias")  # the slots of the one-layer model, in table order


class FakeRecorder:
    """A ``clock.Recorder`` that logs every call as a tuple.

    Args:
        skip: What ``before_update`` answers (True: a remedy skipped the step).
        reopen: What ``reopen_row`` answers (False: the row was flushed already).
    """

    def __init__(self, skip: bool = False, reopen: bool = True) -> None:
        self.calls: list[tuple] = []
        self.skip = skip
        self.reopen = reopen
        self._measured = 0

    def take(self) -> list[tuple]:
        """The calls since the last take."""
        calls, self.calls = self.calls, []
        return calls

    def open_row(self, step):
        self.calls.append(("open_row", step))

    def reopen_row(self, step, drop_current):
        self.calls.append(("reopen_row", step, drop_current))
        return self.reopen

    def discard_row(self):
        self.calls.append(("discard_row",))

    def record_grads(self, slots, grad_scale=None, known_nonfinite=False, at_backward=False):
        self._measured += 1
        self.calls.append(
            ("record_grads", tuple(s.name for s in slots), grad_scale, known_nonfinite, at_backward)
        )
        return f"m{self._measured}"  # what before_update must be handed back

    def before_update(self, opt, measured, grad_scale):
        self.calls.append(("before_update", opt, measured, grad_scale))
        return self.skip

    def after_update(self, opt):
        self.calls.append(("after_update", opt))

    def snapshot_weights(self, slots):
        self.calls.append(("snapshot_weights", tuple(s.name for s in slots)))

    def update_weights(self):
        self.calls.append(("update_weights",))

    def cancel_weights(self):
        self.calls.append(("cancel_weights",))

    def end_window(self):
        self.calls.append(("end_window",))

    def commit_row(self):
        self.calls.append(("commit_row",))

    def set_sampling(self, sampled):
        self.calls.append(("set_sampling", sampled))

    def note_loss(self, loss):
        self.calls.append(("note_loss", float(loss)))

    def note_skipped(self, value):
        # a tensor (a fused optimizer's found_inf) is kept as is: compared by identity
        self.calls.append(("note_skipped", value))

    def note_scale(self, scale):
        self.calls.append(("note_scale", float(scale)))


def _clock(step_on="optimizer", every=1, update_every=1, explicit=(), models=None, **rec):
    models = models if models is not None else {"": nn.Linear(2, 1)}
    table = LayerTable.build(models, gradscope.Config())
    recorder = FakeRecorder(**rec)
    return Clock(table, recorder, step_on, every, update_every, explicit), recorder


def _commit(next_sampled: bool, end_window: bool = True) -> list[tuple]:
    """What closing a step asks of the recorder (``next_sampled``: the next step's sampling)."""
    return [
        ("update_weights",),
        *([("end_window",)] if end_window else []),
        ("commit_row",),
        ("set_sampling", next_sampled),
    ]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


# -- optimizer mode --------------------------------------------------------------------------------
def test_one_optimizer_three_steps():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", every=3, update_every=2, models={"": model})
    opt = _sgd(model)
    assert (clock.step, clock.mode, clock.row_open) == (0, "optimizer", False)
    for k in range(3):
        clock.before_backward()
        assert rec.take() == []  # nothing to look for once the mode is settled
        clock.after_backward(torch.tensor(k + 0.5))
        assert rec.take() == [("open_row", k), ("note_loss", k + 0.5), ("end_window",)]
        assert clock.row_open and clock.step == k

        clock.optimizer_pre(opt, False)
        assert clock.in_optimizer_step
        snapshot = [("snapshot_weights", ALL)] if k % 2 == 0 else []  # update_every=2
        assert rec.take() == [
            ("record_grads", ALL, None, False, False),
            ("before_update", opt, f"m{k + 1}", None),
            *snapshot,
        ]
        clock.optimizer_post(opt)
        assert not clock.in_optimizer_step
        # every=3: activation statistics on steps 0 and 3
        assert rec.take() == [
            ("after_update", opt),
            ("update_weights",),
            *_commit(next_sampled=k + 1 == 3),
        ]
        assert (clock.step, clock.row_open) == (k + 1, False)
    assert clock.optimizers() == [opt]


def test_gradient_accumulation_is_one_step_with_grads_read_at_the_optimizer():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model})
    opt = _sgd(model)
    for k in range(3):
        clock.before_backward()
        clock.after_backward(torch.tensor(float(k)))
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", 0.0),
        ("end_window",),
        ("note_loss", 1.0),
        ("end_window",),
        ("note_loss", 2.0),
        ("end_window",),
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m1", None),
        ("snapshot_weights", ALL),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]
    assert clock.step == 1


def _backward(clock: Clock, model: nn.Module, seed: int) -> float:
    """A forward and backward pass of ``model`` with the clock told, as the backward patch
    tells it. Returns the loss."""
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed))
    loss = model(x).pow(2).sum()
    clock.before_backward()
    loss.backward()
    clock.after_backward(loss.detach())
    return loss.item()


def test_auto_mode_accumulation_reads_at_backward_until_the_first_optimizer_step():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    opt = _sgd(model)
    losses = [_backward(clock, model, k) for k in range(3)]
    # until an optimizer steps, each backward pass could be a hand-written loop's step: the
    # gradients are read at each one; no update happened in between, so it stays one step
    assert (clock.mode, clock.step) == ("auto", 0)
    clock.optimizer_pre(opt, False)
    opt.step()
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", losses[0]),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
        ("note_loss", losses[1]),
        ("record_grads", ALL, None, False, True),
        ("end_window",),
        ("note_loss", losses[2]),
        ("record_grads", ALL, None, False, True),
        ("end_window",),
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m4", None),
        ("snapshot_weights", ALL),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]
    assert (clock.mode, clock.step) == ("optimizer", 1)

    # the next accumulation cycle: settled, the gradients are read once, at the optimizer
    opt.zero_grad()
    losses = [_backward(clock, model, 10 + k) for k in range(3)]
    clock.optimizer_pre(opt, False)
    opt.step()
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 1),
        ("note_loss", losses[0]),
        ("end_window",),
        ("note_loss", losses[1]),
        ("end_window",),
        ("note_loss", losses[2]),
        ("end_window",),
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m5", None),
        ("snapshot_weights", ALL),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]


def _gan():
    d, g = nn.Linear(2, 1), nn.Linear(1, 2)
    clock, rec = _clock("optimizer", models={"d": d, "g": g})
    return clock, rec, _sgd(d), _sgd(g)


D, G = ("d.weight", "d.bias"), ("g.weight", "g.bias")


def test_two_optimizers_a_gan_discovers_the_second_and_reopens_the_step():
    clock, rec, opt_d, opt_g = _gan()
    clock.after_backward(torch.tensor(1.0))
    clock.optimizer_pre(opt_d, False)
    clock.optimizer_post(opt_d)
    # only D is known: its step looks complete
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", 1.0),
        ("end_window",),
        ("record_grads", D, None, False, False),
        ("before_update", opt_d, "m1", None),
        ("snapshot_weights", D),
        ("after_update", opt_d),
        ("update_weights",),
        *_commit(True),
    ]
    assert (clock.step, clock.row_open) == (1, False)

    clock.after_backward(torch.tensor(2.0))  # G's backward: looks like step 1
    assert rec.take() == [("open_row", 1), ("note_loss", 2.0), ("end_window",)]
    clock.optimizer_pre(opt_g, False)
    # G shows up right after D ended the step: step 0 was not complete; row 1 is dropped
    assert rec.take() == [
        ("reopen_row", 0, True),
        ("set_sampling", True),
        ("record_grads", G, None, False, False),
        ("before_update", opt_g, "m2", None),
        ("snapshot_weights", G),
    ]
    assert (clock.step, clock.row_open) == (0, True)
    clock.optimizer_post(opt_g)
    assert rec.take() == [("after_update", opt_g), ("update_weights",), *_commit(True)]
    assert clock.step == 1

    # from now on a step is D then G
    clock.after_backward(torch.tensor(3.0))
    clock.optimizer_pre(opt_d, False)
    clock.optimizer_post(opt_d)
    assert rec.take() == [
        ("open_row", 1),
        ("note_loss", 3.0),
        ("end_window",),
        ("record_grads", D, None, False, False),
        ("before_update", opt_d, "m3", None),
        ("snapshot_weights", D),
        ("after_update", opt_d),
        ("update_weights",),  # not complete: G has not stepped
    ]
    assert (clock.step, clock.row_open) == (1, True)
    clock.after_backward(torch.tensor(4.0))
    clock.optimizer_pre(opt_g, False)
    clock.optimizer_post(opt_g)
    assert rec.take() == [
        ("note_loss", 4.0),
        ("end_window",),  # the same row
        ("record_grads", G, None, False, False),
        ("before_update", opt_g, "m4", None),
        ("snapshot_weights", G),
        ("after_update", opt_g),
        ("update_weights",),
        *_commit(True),
    ]
    assert clock.step == 2
    assert clock.optimizers() == [opt_d, opt_g]

    # D steps twice in a row (G skips an iteration): D's second step begins a new step
    clock.after_backward(torch.tensor(5.0))
    clock.optimizer_pre(opt_d, False)
    clock.optimizer_post(opt_d)
    rec.take()
    clock.after_backward(torch.tensor(6.0))
    clock.optimizer_pre(opt_d, False)
    assert rec.take() == [
        ("note_loss", 6.0),
        ("end_window",),
        *_commit(True),
        ("open_row", 3),
        ("record_grads", D, None, False, False),
        ("before_update", opt_d, "m6", None),
        ("snapshot_weights", D),
    ]
    assert clock.step == 3


def test_a_gan_step_that_cannot_be_reopened_goes_on_with_the_next_discriminator_step():
    clock, rec, opt_d, opt_g = _gan()
    rec.reopen = False  # step 0's row was flushed already
    for loss, opt in ((1.0, opt_d), (2.0, opt_g)):
        clock.after_backward(torch.tensor(loss))
        clock.optimizer_pre(opt, False)
        clock.optimizer_post(opt)
    calls = rec.take()
    assert ("reopen_row", 0, True) in calls
    assert calls.count(("commit_row",)) == 1  # G's step did not complete step 1
    assert (clock.step, clock.row_open) == (1, True)
    clock.after_backward(torch.tensor(3.0))
    clock.optimizer_pre(opt_d, False)
    clock.optimizer_post(opt_d)  # G then D: every known optimizer stepped
    assert rec.take()[-4:] == _commit(True)
    assert (clock.step, clock.row_open) == (2, False)


def test_a_fused_optimizer_under_gradscaler_hands_over_its_scale_and_found_inf():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model})
    opt = _sgd(model)
    # what GradScaler sets on an optimizer that unscales inside its own step (fused=True)
    opt.grad_scale = torch.tensor(0.125)
    opt.found_inf = torch.tensor(0.0)
    clock.after_backward(None)
    clock.optimizer_pre(opt, False)
    assert rec.take() == [
        ("open_row", 0),
        ("end_window",),  # no loss given: none noted
        ("record_grads", ALL, opt.grad_scale, False, False),
        ("note_skipped", opt.found_inf),
        ("before_update", opt, "m1", opt.grad_scale),
        ("snapshot_weights", ALL),
    ]


def test_a_step_a_remedy_skips_takes_no_weight_snapshot():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model}, skip=True)
    opt = _sgd(model)
    clock.after_backward(torch.tensor(1.0))
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", 1.0),
        ("end_window",),
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m1", None),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]


def test_explicit_optimizers_only_count():
    model = nn.Linear(2, 1)
    ours = _sgd(model)
    other = _sgd(model)  # steps the same parameters, but was not passed to watch
    clock, rec = _clock("auto", explicit=[ours], models={"": model})
    assert clock.slots_for(other) == []
    assert [s.name for s in clock.slots_for(ours)] == list(ALL)
    clock.optimizer_pre(other, False)
    clock.optimizer_post(other)
    clock.scaler_step(other, torch.tensor(2.0))
    clock.scaler_skipped(other)
    assert rec.take() == []
    assert (clock.mode, clock.step, clock.row_open) == ("auto", 0, False)
    clock.optimizer_pre(ours, False)
    clock.optimizer_post(ours)
    assert (clock.mode, clock.step) == ("optimizer", 1)
    assert clock.optimizers() == [ours]


def test_an_optimizer_of_unwatched_parameters_is_ignored():
    watched, other = nn.Linear(2, 1), nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": watched})
    opt = _sgd(other)
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    assert rec.take() == []
    assert clock.mode == "auto" and clock.optimizers() == []


def test_slots_follow_the_optimizers_param_groups_and_the_table():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    config = gradscope.Config()
    table = LayerTable.build({"a": a}, config)
    clock = Clock(table, FakeRecorder(), "optimizer", 1, 1)
    opt = torch.optim.SGD([a.weight], lr=0.1)
    assert [s.name for s in clock.slots_for(opt)] == ["a.weight"]
    opt.add_param_group({"params": [a.bias, *b.parameters()]})
    assert [s.name for s in clock.slots_for(opt)] == ["a.weight", "a.bias"]
    table.extend({"b": b}, config)  # a model joins the run: same groups, new slots
    assert [s.name for s in clock.slots_for(opt)] == ["a.weight", "a.bias"]  # cached
    clock.forget_slots()
    assert [s.name for s in clock.slots_for(opt)] == ["a.weight", "a.bias", "b.weight", "b.bias"]


# -- closures (LBFGS & co) -------------------------------------------------------------------------
def test_a_closure_step_reads_grads_at_its_first_backward_and_one_loss():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model})
    opt = torch.optim.LBFGS(model.parameters())
    for k in range(2):
        clock.optimizer_pre(opt, True)
        assert rec.take() == [("open_row", k), ("snapshot_weights", ALL)]
        assert clock.in_optimizer_step
        clock.before_backward()
        clock.after_backward(torch.tensor(5.0 - k))  # the closure's first evaluation
        assert rec.take() == [
            ("record_grads", ALL, None, False, True),
            ("before_update", opt, f"m{k + 1}", None),
            ("note_loss", 5.0 - k),
        ]
        for loss in (4.0, 3.0):  # the line search evaluates the closure again
            clock.before_backward()
            clock.after_backward(torch.tensor(loss))
        assert rec.take() == []
        clock.optimizer_post(opt)
        assert rec.take() == [("after_update", opt), ("update_weights",), *_commit(True)]
        assert clock.step == k + 1 and not clock.in_optimizer_step


def test_a_closure_step_a_remedy_skips_cancels_the_weight_snapshot():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model}, skip=True)
    opt = torch.optim.LBFGS(model.parameters())
    clock.optimizer_pre(opt, True)
    clock.after_backward(torch.tensor(1.0))
    assert rec.take() == [
        ("open_row", 0),
        ("snapshot_weights", ALL),
        ("record_grads", ALL, None, False, True),
        ("before_update", opt, "m1", None),
        ("cancel_weights",),
        ("note_loss", 1.0),
    ]


def test_a_closure_that_never_runs_backward_has_its_grads_read_after_the_step():
    model = nn.Linear(2, 1)
    clock, rec = _clock("optimizer", models={"": model})
    opt = torch.optim.LBFGS(model.parameters())
    clock.optimizer_pre(opt, True)
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 0),
        ("snapshot_weights", ALL),
        ("record_grads", ALL, None, False, False),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]


def test_a_real_lbfgs_step_takes_the_first_closure_evaluation_only():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    # per-optimizer hooks, as watch(optimizers=...) registers them (never global ones here)
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: clock.optimizer_pre(o, True))
    post = opt.register_step_post_hook(lambda o, args, kwargs: clock.optimizer_post(o))
    x = torch.randn(8, 2)
    y = x.sum(dim=1, keepdim=True)
    losses: list[float] = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        clock.before_backward()
        loss.backward()
        clock.after_backward(loss.detach())
        losses.append(loss.item())
        return loss

    try:
        opt.step(closure)
    finally:
        pre.remove()
        post.remove()
    assert len(losses) > 1  # the closure ran several times
    calls = rec.take()
    assert [c for c in calls if c[0] == "note_loss"] == [("note_loss", losses[0])]
    assert [c for c in calls if c[0] == "record_grads"] == [
        ("record_grads", ALL, None, False, True)
    ]
    assert calls.count(("commit_row",)) == 1
    assert (clock.mode, clock.step) == ("optimizer", 1)


# -- GradScaler ------------------------------------------------------------------------------------
def test_a_step_gradscaler_skips_is_noted_and_measures_no_update():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    opt = _sgd(model)
    clock.after_backward(torch.tensor(1.0))
    rec.take()
    clock.scaler_step(opt, torch.tensor(65536.0))
    clock.scaler_skipped(opt)  # inf/NaN found: opt.step() never ran, no optimizer hook fired
    assert rec.take() == [
        ("note_scale", 65536.0),
        ("record_grads", ALL, None, True, False),
        ("note_skipped", 1.0),
        ("cancel_weights",),
        *_commit(True),
    ]
    assert (clock.mode, clock.step) == ("optimizer", 1)

    clock.scaler_step(opt, torch.tensor(32768.0))  # no backward seen yet: opens the row
    clock.scaler_step(opt, None)  # no scale: nothing to note
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("open_row", 1),
        ("note_scale", 32768.0),
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m3", None),
        ("snapshot_weights", ALL),
        ("after_update", opt),
        ("update_weights",),
        *_commit(True),
    ]


# -- backward mode ---------------------------------------------------------------------------------
def test_backward_mode_each_backward_pass_is_a_step_closed_lazily():
    model = nn.Linear(2, 1)
    clock, rec = _clock("backward", every=2, update_every=2, models={"": model})
    clock.before_backward()
    clock.after_backward(torch.tensor(1.0))
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", 1.0),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
        ("set_sampling", False),  # the next forward is step 1's: not sampled (every=2)
    ]
    assert (clock.step, clock.row_open) == (0, True)  # open until the next backward pass

    clock.before_backward()
    clock.after_backward(torch.tensor(2.0))
    # step 0 closes now, after the hand-written update; the forward just run is step 1's
    assert rec.take() == [
        *_commit(False, end_window=False),
        ("open_row", 1),
        ("note_loss", 2.0),
        ("record_grads", ALL, None, False, True),  # step 1: no snapshot (update_every=2)
        ("end_window",),
        ("set_sampling", True),
    ]
    clock.before_backward()
    clock.after_backward(torch.tensor(3.0))
    assert rec.take() == [
        *_commit(True, end_window=False),
        ("open_row", 2),
        ("note_loss", 3.0),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
        ("set_sampling", False),
    ]
    assert clock.step == 2

    clock.finish()  # the last step is complete: committed, with its window
    assert rec.take() == _commit(False)
    assert (clock.step, clock.row_open) == (3, False)
    clock.finish()
    assert rec.take() == []


def test_forced_backward_mode_ignores_optimizers():
    model = nn.Linear(2, 1)
    clock, rec = _clock("backward", models={"": model})
    opt = _sgd(model)
    clock.after_backward(torch.tensor(1.0))
    rec.take()
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    clock.scaler_skipped(opt)
    assert rec.take() == []
    assert (clock.mode, clock.step, clock.row_open) == ("backward", 0, True)


# -- auto mode: evidence of a hand-written update --------------------------------------------------
def _update_data(model: nn.Module) -> None:
    """``w.data -= lr * w.grad``: moves no version counter."""
    for p in model.parameters():
        p.data.sub_(0.1 * p.grad)
        p.grad.zero_()


def _update_in_place_unchanged(model: nn.Module) -> None:
    """An in-place update under no_grad that leaves the values as they were: only the
    version counter tells."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
            p.grad.zero_()


def _reset_grads(model: nn.Module) -> None:
    """The gradients set to None (zero_grad's default); the weights untouched."""
    model.zero_grad()


@pytest.mark.parametrize("update", [_update_data, _update_in_place_unchanged, _reset_grads])
def test_auto_mode_switches_to_backward_on_evidence_of_an_update(update):
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    loss0 = _backward(clock, model, 0)
    assert rec.take() == [
        ("open_row", 0),
        ("note_loss", loss0),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update(model)
    changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert changed == (update is _update_data)  # the other two leave the values as they were
    loss1 = _backward(clock, model, 1)
    assert clock.mode == "backward"
    assert rec.take() == [
        *_commit(True, end_window=False),
        ("open_row", 1),
        ("note_loss", loss1),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
        ("set_sampling", True),
    ]
    update(model)
    loss2 = _backward(clock, model, 2)
    assert rec.take()[:5] == [
        *_commit(True, end_window=False),
        ("open_row", 2),
        ("note_loss", loss2),
    ]
    assert clock.step == 2
    clock.finish()  # backward mode: the last step is complete
    assert rec.take() == _commit(True)
    assert clock.step == 3


def test_auto_mode_without_evidence_keeps_one_open_step_and_commits_it_at_finish():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    for k in range(3):
        _backward(clock, model, k)  # gradients accumulate; nothing updates the weights
    calls = rec.take()
    assert calls.count(("open_row", 0)) == 1 and ("commit_row",) not in calls
    assert (clock.mode, clock.step, clock.row_open) == ("auto", 0, True)
    clock.finish()  # no optimizer ever came: the step is complete as it is
    assert rec.take() == _commit(True)
    assert clock.step == 1


# -- finish ----------------------------------------------------------------------------------------
def test_finish_drops_a_step_that_never_reached_its_optimizer():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", models={"": model})
    opt = _sgd(model)
    clock.after_backward(torch.tensor(1.0))
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    clock.after_backward(torch.tensor(2.0))  # the run ends before this step's optimizer step
    rec.take()
    clock.finish()
    assert rec.take() == [("discard_row",)]
    assert (clock.step, clock.row_open) == (1, False)
    clock.finish()
    assert rec.take() == []


def test_finish_with_nothing_open_does_nothing():
    clock, rec = _clock("auto")
    clock.finish()
    assert rec.take() == [] and clock.step == 0


# -- manual mode -----------------------------------------------------------------------------------
def test_manual_step_ends_steps_only_there():
    model = nn.Linear(2, 1)
    clock, rec = _clock("auto", every=2, update_every=1, models={"": model})
    clock.manual_step()  # Scope.step() with nothing recorded yet: an empty step
    assert clock.mode == "manual"
    assert rec.take() == [("open_row", 0), *_commit(False)]
    assert (clock.step, clock.row_open) == (1, False)

    losses = [_backward(clock, model, k) for k in range(2)]
    _update_data(model)  # would be evidence in auto mode; manual mode does not look
    losses.append(_backward(clock, model, 2))
    assert rec.take() == [
        ("open_row", 1),
        ("note_loss", losses[0]),
        ("record_grads", ALL, None, False, True),
        ("snapshot_weights", ALL),
        ("end_window",),
        ("note_loss", losses[1]),
        ("record_grads", ALL, None, False, True),
        ("end_window",),
        ("note_loss", losses[2]),
        ("record_grads", ALL, None, False, True),
        ("end_window",),
    ]
    assert (clock.mode, clock.step) == ("manual", 1)

    # an optimizer in manual mode: grads are read at its step, which ends nothing
    opt = _sgd(model)
    clock.optimizer_pre(opt, False)
    clock.optimizer_post(opt)
    assert rec.take() == [
        ("record_grads", ALL, None, False, False),
        ("before_update", opt, "m4", None),
        ("snapshot_weights", ALL),
        ("after_update", opt),
        ("update_weights",),
    ]
    assert (clock.mode, clock.step, clock.row_open) == ("manual", 1, True)
    loss = _backward(clock, model, 3)  # an optimizer is known now: no read at backward
    assert rec.take() == [("note_loss", loss), ("end_window",)]
    clock.manual_step()
    assert rec.take() == _commit(True)
    assert clock.step == 2
    clock.finish()
    assert rec.take() == []


def test_sampling_arithmetic():
    clock, _ = _clock("auto", every=3, update_every=2)
    assert [clock.sampled(s) for s in range(7)] == [True, False, False, True, False, False, True]
    sampled, updates = [], []
    for _ in range(7):
        sampled.append(clock.sampled())
        updates.append(clock.sampled_updates())
        clock.manual_step()
    assert sampled == [True, False, False, True, False, False, True]
    assert updates == [True, False, True, False, True, False, True]
    assert clock.step == 7
