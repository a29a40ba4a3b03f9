"""The remedies' parts on their own (no Scope, no watch()): the step guard, the step-time
remedies (guard, then clip) on hand-made measurements, the LayerTable queries the remedies use,
the finding-time remedies (swap, recycle) with a stand-in activation probe, and the wiring
helpers (describe(), Remedies). Each checked against an oracle or a hand calculation:
torch's ``clip_grad_norm_``, the published AGC formula, a second optimizer left alone, a
deepcopy."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import gradscope.remedies as remedies_pkg
from gradscope.config import Config
from gradscope.events import Event
from gradscope.layers import Family, LayerTable
from gradscope.parts import Remedies
from gradscope.remedies import NonfiniteStepsError, describe
from gradscope.remedies.spec import parse_clip, parse_swap
from gradscope.remedies.steps import StepGuard, StepRemedies
from gradscope.remedies.units import Action, UnitRemedies
from gradscope.rules.engine import Diagnoser
from gradscope.rules.thresholds import Thresholds

from models import half_dead_linear

# -- helpers -----------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _backward(model: nn.Module, scale: float = 10.0, seed: int = 0) -> None:
    """Gradients of a loss large enough that norm:1.0 clips."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    model.zero_grad(set_to_none=True)
    (model(x).pow(2).sum() * scale).backward()


def _set_grads(params: list[torch.Tensor], scale: float, seed: int = 0) -> None:
    """Deterministic gradients of a chosen size (the same for two copies of a model)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _measured(table: LayerTable) -> tuple[list[Any], list[torch.Tensor], torch.Tensor]:
    """What the gradient probe hands over: the watched slots with a gradient, their
    gradients, and their fp32 norms (the oracle: one vector_norm per gradient)."""
    slots = [s for s in table.params if s.param.grad is not None]
    grads = [s.param.grad for s in slots]
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return slots, grads, norms


def _grads(params: Any) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def _assert_equal_state(a: Any, b: Any) -> None:
    """Two optimizer state_dicts hold the same values, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_state(x, y)
    else:
        assert a == b


def _finite_norms(opt: torch.optim.Optimizer) -> torch.Tensor:
    return torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]])


# -- StepGuard ---------------------------------------------------------------------------------


def test_guard_finite_step_is_not_skipped_and_emits_nothing():
    model = _mlp()
    _backward(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.grad for p in model.parameters()]
    events: list[Event] = []
    guard = StepGuard(3, events.append)
    guard.consecutive = 2  # left over from earlier skips: a finite step resets it
    assert guard.check(opt, _finite_norms(opt), step=7) is False
    assert guard.consecutive == 0 and guard.skips == 0 and events == []
    assert all(p.grad is g for p, g in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    ],
    ids=["Adam", "AdamW", "SGD"],
)
def test_guard_skip_leaves_weights_and_optimizer_state_bit_identical(make_opt):
    model = _mlp()
    opt = make_opt(model.parameters())
    for i in range(2):  # real steps first: moments, momentum buffers and step counts exist
        _backward(model, scale=1.0, seed=i)
        opt.step()
    _backward(model, scale=1.0, seed=5)
    next(model.parameters()).grad[0, 0] = float("nan")
    params = list(model.parameters())
    hidden = [p.grad for p in params]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in hidden])
    assert not torch.isfinite(norms).all()
    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    events: list[Event] = []
    guard = StepGuard(3, events.append)

    assert guard.check(opt, norms, step=5) is True
    assert all(p.grad is None for p in params)  # the optimizer sees no gradient
    opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    _assert_equal_state(opt.state_dict(), state)
    guard.restore(opt)
    assert all(p.grad is g for p, g in zip(params, hidden))  # the same tensors, put back
    assert events == [
        {
            "event": "remedy",
            "remedy": "guard",
            "action": "skip_step",
            "step": 5,
            "consecutive": 1,
            "optimizer": type(opt).__name__,
        }
    ]
    assert isinstance(events[0], Event) and events[0].name == "remedy"

    # oracle that the step would have changed them: the same step, not hidden
    opt.step()
    assert not all(torch.equal(p.detach(), w) for p, w in zip(params, weights))


def test_guard_restore_is_per_optimizer_and_once():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for m in (a, b):
        m.weight.grad = torch.ones(2, 2)
        m.bias.grad = torch.ones(2)
    a.weight.grad = torch.full((2, 2), float("inf"))  # the elements decide, not the norm
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    guard = StepGuard(5, lambda e: None)
    grad_a = a.weight.grad
    assert guard.check(opt_a, torch.tensor([float("inf"), 1.0]), step=0)
    guard.restore(opt_b)  # nothing hidden from opt_b: opt_a's stay hidden
    assert a.weight.grad is None and b.weight.grad is not None
    guard.restore(opt_a)
    assert a.weight.grad is grad_a
    replaced = torch.zeros(2, 2)
    a.weight.grad = replaced
    guard.restore(opt_a)  # a second restore puts back nothing stale
    assert a.weight.grad is replaced


def test_guard_aborts_after_max_skips_in_a_row_naming_the_steps():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), float("nan"))
    model.bias.grad = torch.ones(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nan = torch.tensor([float("nan"), 1.0])
    events: list[Event] = []
    guard = StepGuard(2, events.append)
    for step in (10, 11):
        assert guard.check(opt, nan, step)
        guard.restore(opt)
    with pytest.raises(NonfiniteStepsError) as info:
        guard.check(opt, nan, 12)
    msg = str(info.value)
    assert "3 optimizer steps in a row" in msg and "(steps 10-12)" in msg
    assert "the first 2 were skipped" in msg
    assert isinstance(info.value, RuntimeError)
    assert [e["action"] for e in events] == ["skip_step", "skip_step", "abort"]
    assert [e["consecutive"] for e in events] == [1, 2, 3]
    assert events[-1] == {
        "event": "remedy",
        "remedy": "guard",
        "action": "abort",
        "step": 12,
        "consecutive": 3,
    }
    # the aborted step hides nothing: the gradients stay for the finding and the tracer
    assert model.weight.grad is not None and model.bias.grad is not None


def test_guard_count_restarts_after_a_finite_step():
    model = nn.Linear(2, 1)
    model.weight.grad = torch.ones(1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nan, ok = torch.tensor([float("nan")]), torch.tensor([1.0])
    guard = StepGuard(2, lambda e: None)
    for step, norms, skip in [
        (0, nan, True),
        (1, nan, True),
        (2, ok, False),
        (3, nan, True),
        (4, nan, True),
    ]:
        assert guard.check(opt, norms, step) is skip
        guard.restore(opt)
    assert guard.consecutive == 2 and guard.first_skip == 3 and guard.skips == 4
    with pytest.raises(NonfiniteStepsError, match=r"\(steps 3-5\)"):
        guard.check(opt, nan, 5)


# -- StepRemedies: guard and clip --------------------------------------------------------------


def test_norm_clip_matches_clip_grad_norm_bit_for_bit():
    model = _mlp()
    ref = copy.deepcopy(model)
    _backward(model)
    _backward(ref)
    table = LayerTable.build({"": model}, Config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    slots, _, norms = _measured(table)
    rem = StepRemedies(parse_clip("norm:1.0"), 0, table, lambda e: None)

    skip, result = rem.before_step(opt, (slots, [], norms), None, False, 0)
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)

    assert skip is False and result is not None
    assert total > 2.0  # the oracle clips (the test can fail)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(result.total_pre, total)
    assert result.slots == slots
    coef = 1.0 / (total + 1e-6)
    torch.testing.assert_close(result.coef, coef.expand(len(slots)))
    torch.testing.assert_close(result.post, norms * coef)
    torch.testing.assert_close(result.total_post, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(result.threshold, torch.tensor(1.0))


def test_norm_clip_without_measurements_clips_every_gradient():
    model, ref = _mlp(), _mlp()
    _backward(model)
    _backward(ref)
    table = LayerTable.build({"": model}, Config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rem = StepRemedies(parse_clip("norm:0.5"), 0, table, lambda e: None)
    _, result = rem.before_step(opt, None, None, False, 0)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert result is not None and result.slots == [] and result.post.numel() == 0


def test_unwatched_parameters_count_in_the_total_norm():
    model, ref = _mlp(), _mlp()
    extra = nn.Parameter(torch.zeros(5))
    extra_ref = nn.Parameter(torch.zeros(5))
    _backward(model)
    _backward(ref)
    extra.grad = torch.full((5,), 3.0)
    extra_ref.grad = extra.grad.clone()
    table = LayerTable.build({"": model}, Config())
    # the unwatched parameter comes first in the optimizer
    opt = torch.optim.SGD([extra, *model.parameters()], lr=0.1)
    slots, _, norms = _measured(table)
    rem = StepRemedies(parse_clip("norm:1.0"), 0, table, lambda e: None)
    without = _grads(model.parameters())
    total_watched = torch.linalg.vector_norm(norms)

    _, result = rem.before_step(opt, (slots, [], norms), None, False, 0)
    total = torch.nn.utils.clip_grad_norm_([extra_ref, *ref.parameters()], 1.0)

    assert result is not None
    hand = torch.sqrt(total_watched**2 + 5 * 3.0**2)
    torch.testing.assert_close(result.total_pre, hand)
    torch.testing.assert_close(result.total_pre, total)
    torch.testing.assert_close(extra.grad, extra_ref.grad)
    for p, q, w in zip(model.parameters(), ref.parameters(), without):
        torch.testing.assert_close(p.grad, q.grad)
        # leaving the extra out would have clipped less
        assert not torch.allclose(q.grad, w * (1.0 / (total_watched + 1e-6)))
    assert result.slots == slots and result.post.numel() == len(slots)


def test_optimizer_order_differs_from_the_table_order():
    model, ref = _mlp(), _mlp()
    _backward(model)
    _backward(ref)
    table = LayerTable.build({"": model}, Config())
    params = list(model.parameters())
    opt = torch.optim.SGD(list(reversed(params)), lr=0.1)
    slots, _, norms = _measured(table)
    rem = StepRemedies(parse_clip("norm:1.0,per_layer"), 0, table, lambda e: None)

    _, result = rem.before_step(opt, (slots, [], norms), None, False, 0)
    for q in ref.parameters():
        torch.nn.utils.clip_grad_norm_([q], 1.0)

    assert result is not None
    assert result.slots == list(reversed(slots))  # the optimizer's order
    for p, q in zip(params, ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    # each post norm belongs to its slot: min(norm, 1) per tensor, in the optimizer's order
    rev = norms.flip(0)
    torch.testing.assert_close(result.post, torch.clamp(rev, max=1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.threshold, torch.ones(len(slots)))


def test_grad_scale_divides_only_the_unwatched_norms():
    model = _mlp()
    _backward(model)
    extra = nn.Parameter(torch.zeros(4))
    extra.grad = torch.full((4,), 8.0)  # norm 16, scaled by 4: unscaled norm 4
    table = LayerTable.build({"": model}, Config())
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    slots, _, norms = _measured(table)
    rem = StepRemedies(parse_clip("norm:1e6"), 0, table, lambda e: None)  # records only
    _, result = rem.before_step(opt, (slots, [], norms), torch.tensor(4.0), False, 0)
    assert result is not None
    hand = math.sqrt(float((norms.double() ** 2).sum()) + 4.0**2)
    assert result.total_pre.item() == pytest.approx(hand, rel=1e-6)
    # the watched norms are taken as given (already unscaled): not divided again
    assert torch.equal(result.post, norms)


def test_guard_runs_before_clip_and_not_under_a_scaler():
    model = _mlp()
    _backward(model)
    model[0].weight.grad[0, 0] = float("inf")
    table = LayerTable.build({"": model}, Config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    slots, _, norms = _measured(table)
    events: list[Event] = []
    rem = StepRemedies(parse_clip("norm:1.0"), 3, table, events.append)
    assert rem.max_skips == 3
    before = _grads(model.parameters())

    # under a GradScaler: no guard (the scaler skips the step itself); the non-finite step
    # is not clipped either (coefficient exactly 1)
    skip, result = rem.before_step(opt, (slots, [], norms), None, True, 0)
    assert skip is False and result is not None and events == []
    assert all(p.grad is not None for p in model.parameters())
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
    assert rem.guard is not None and rem.guard.consecutive == 0
    clippers = len(rem.state_dict()["clippers"])

    # without the scaler: skipped, nothing clipped, gradients hidden until after_step
    rem2 = StepRemedies(parse_clip("norm:1.0"), 3, table, events.append)
    skip, result = rem2.before_step(opt, (slots, [], norms), None, False, 4)
    assert skip is True and result is None
    assert all(p.grad is None for p in model.parameters())
    assert rem2.state_dict() == {
        "clip": "norm:max=1,per_layer=false",
        "clippers": [],
        "guard_consecutive": 1,
    }
    rem2.after_step(opt)
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
    assert [e["action"] for e in events] == ["skip_step"] and clippers == 1


def test_guard_only_on_a_finite_step_returns_no_clip_result():
    model = _mlp()
    _backward(model)
    table = LayerTable.build({"": model}, Config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rem = StepRemedies(None, 2, table, lambda e: None)
    assert rem.before_step(opt, _measured(table), None, False, 0) == (False, None)
    model.zero_grad(set_to_none=True)
    assert rem.before_step(opt, None, None, False, 1) == (False, None)  # no gradient at all


def _history_run(
    model: nn.Module,
    rem: StepRemedies,
    opt: torch.optim.Optimizer,
    scales: list[float],
    seed0: int = 0,
) -> list[Any]:
    results = []
    for i, scale in enumerate(scales):
        _set_grads(list(model.parameters()), scale, seed=seed0 + i)
        _, result = rem.before_step(opt, _measured(rem.table), None, False, i)
        results.append(result)
    return results


@pytest.mark.parametrize(
    "spec", ["autoclip:p=50", "zclip:z=2,warmup=3,alpha=0.9", "autoclip:p=25,history=3,per_layer"]
)
def test_clip_history_survives_state_dict_round_trip(spec):
    clip = parse_clip(spec)
    history = [1.0, 1.2, 0.8, 1.1, 0.9]
    spike = [40.0]

    def make() -> tuple[nn.Module, StepRemedies, torch.optim.Optimizer, list[Event]]:
        model = _mlp()
        events: list[Event] = []
        rem = StepRemedies(clip, 0, LayerTable.build({"": model}, Config()), events.append)
        return model, rem, torch.optim.SGD(model.parameters(), lr=0.1), events

    model, rem, opt, _ = make()
    _history_run(model, rem, opt, history)
    saved = rem.state_dict()
    assert saved["clip"] == str(clip) and len(saved["clippers"]) == 1
    (original,) = _history_run(model, rem, opt, spike, seed0=100)
    clipped = _grads(model.parameters())

    model2, rem2, opt2, events2 = make()
    rem2.load_state_dict(copy.deepcopy(saved))
    assert events2 == []  # restored when the optimizer first steps
    (restored,) = _history_run(model2, rem2, opt2, spike, seed0=100)
    assert events2 == [
        {"event": "remedy", "remedy": "clip", "action": "state_restored", "step": None}
    ]
    for a, b in zip(clipped, model2.parameters()):
        assert torch.equal(a, b.grad)
    assert torch.equal(original.threshold, restored.threshold)
    assert torch.equal(original.coef, restored.coef)

    # oracle that the history matters: a fresh remedy clips the spike differently
    model3, rem3, opt3, _ = make()
    (fresh,) = _history_run(model3, rem3, opt3, spike, seed0=100)
    assert not torch.equal(fresh.coef, original.coef)
    assert bool((original.coef < 0.5).all())  # the restored history did clip the spike


def test_load_state_dict_with_another_clip_names_both():
    model = _mlp()
    table = LayerTable.build({"": model}, Config())
    saved = StepRemedies(parse_clip("autoclip"), 0, table, lambda e: None).state_dict()
    rem = StepRemedies(parse_clip("zclip"), 0, table, lambda e: None)
    with pytest.raises(ValueError) as info:
        rem.load_state_dict(saved)
    msg = str(info.value)
    assert "clip='autoclip:p=10,history=0,per_layer=false'" in msg
    assert "clip='zclip:z=2.5,alpha=0.97,warmup=25,factor=1,max=none,per_layer=false'" in msg
    with pytest.raises(ValueError, match="expected the dict"):
        rem.load_state_dict({"clip": None})


def test_state_for_another_optimizer_shape_is_not_restored():
    clip = parse_clip("autoclip:per_layer")
    model = _mlp()
    rem = StepRemedies(clip, 0, LayerTable.build({"": model}, Config()), lambda e: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _history_run(model, rem, opt, [1.0])
    saved = rem.state_dict()

    small = nn.Linear(4, 2)
    events: list[Event] = []
    rem2 = StepRemedies(clip, 3, LayerTable.build({"": small}, Config()), events.append)
    rem2.load_state_dict(saved)
    _set_grads(list(small.parameters()), 1.0)
    rem2.before_step(
        torch.optim.SGD(small.parameters(), lr=0.1), _measured(rem2.table), None, False, 0
    )
    assert events == [
        {
            "event": "remedy",
            "remedy": "clip",
            "action": "state_not_restored",
            "step": None,
            "reason": "sorted holds 4 rows, this optimizer needs 2",
        }
    ]


def test_state_dict_right_after_loading_keeps_the_loaded_history():
    clip = parse_clip("autoclip:p=50")
    model = _mlp()
    rem = StepRemedies(clip, 0, LayerTable.build({"": model}, Config()), lambda e: None)
    _history_run(model, rem, torch.optim.SGD(model.parameters(), lr=0.1), [1.0, 2.0, 3.0])
    saved = rem.state_dict()
    assert len(saved["clippers"]) == 1
    resumed = StepRemedies(clip, 0, LayerTable.build({"": _mlp()}, Config()), lambda e: None)
    resumed.load_state_dict(copy.deepcopy(saved))
    again = resumed.state_dict()  # a checkpoint taken before the resumed run's first step
    assert len(again["clippers"]) == 1
    _assert_equal_state(again["clippers"], saved["clippers"])


def test_guard_count_is_saved_and_restored():
    model = _mlp()
    table = LayerTable.build({"": model}, Config())
    rem = StepRemedies(None, 5, table, lambda e: None)
    _set_grads(list(model.parameters()), 1.0)
    model[0].bias.grad[0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        assert rem.before_step(opt, _measured(table), None, False, step)[0]
        rem.after_step(opt)
    saved = rem.state_dict()
    assert saved == {"clip": None, "clippers": [], "guard_consecutive": 2}
    rem2 = StepRemedies(None, 5, table, lambda e: None)
    rem2.load_state_dict(saved)
    assert rem2.guard is not None and rem2.guard.consecutive == 2


# -- LayerTable queries and AGC skip_last ------------------------------------------------------


class _Net(nn.Module):
    """The head is defined before fc2 but runs last; ``unused`` never runs; a BatchNorm sits
    between fc1 and its ReLU; a Tanh after the head owns no parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(8, 3)
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.act2 = nn.Tanh()
        self.out = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.act2(self.fc2(self.act(self.bn(self.fc1(x)))))))


def _run_marked(net: nn.Module, table: LayerTable, x: torch.Tensor) -> torch.Tensor:
    """A forward whose hooks record the forward order, as the activation probe does."""
    handles = [
        e.module.register_forward_hook(lambda m, a, o, name=e.name: table.mark_executed(name))
        for e in table.modules
    ]
    try:
        return net(x)
    finally:
        for h in handles:
            h.remove()


def test_layer_table_queries_follow_the_forward_order():
    net = _Net()
    table = LayerTable.build({"": net}, Config())
    assert table.executed_modules() == [] and table.last_layer_params() == set()
    assert table.neighbours("act") == (None, [], None)

    _run_marked(net, table, torch.randn(6, 4))
    _run_marked(net, table, torch.randn(6, 4))  # first call wins: the order stays
    names = [e.name for e in table.executed_modules()]
    assert names == ["fc1", "bn", "act", "fc2", "act2", "head", "out"]
    assert table.executed_count() == 7
    assert table.entry("unused") is not None and "unused" not in names

    assert table.entry("act").module is net.act
    assert table.entry("act#1").module is net.act  # a site of the same module
    assert table.entry("act").family is Family.RECTIFIER
    assert table.entry("nope") is None and table.entry("") is None

    # the head runs last among the parameter owners (defined second, after `unused`)
    assert table.last_layer_params() == {id(net.head.weight), id(net.head.bias)}

    assert table.neighbours("act", passthrough=(nn.BatchNorm1d,)) == (net.fc1, [net.bn], net.fc2)
    assert table.neighbours("act") == (net.bn, [], net.fc2)
    assert table.neighbours("act2") == (net.fc2, [], net.head)
    assert table.neighbours("out") == (net.head, [], None)
    assert table.neighbours("unused") == (None, [], None)


def test_mark_executed_by_hand_gives_the_order():
    net = _Net()
    table = LayerTable.build({"": net}, Config())
    for name in ("fc2", "unused", "fc2", "act"):
        table.mark_executed(name)
    assert [e.name for e in table.executed_modules()] == ["fc2", "unused", "act"]
    # `act` owns nothing: the last owner that ran is `unused`
    assert table.last_layer_params() == {id(net.unused.weight), id(net.unused.bias)}
    assert table.neighbours("act") == (net.unused, [], None)


def _agc_oracle(params: list[torch.Tensor], clip: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping as published (Brock et al. 2021, NFNets), written out for
    the test: per unit (a row of a matrix or filter bank; a vector or scalar is one unit), the
    gradient is scaled down to ``clip * max(||w_unit||, eps)`` where its norm is above it."""
    for p in params:
        w, g = p.detach(), p.grad.detach()
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
        w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=w.ndim > 1)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=w.ndim > 1)
        bound = clip * w_norm.clamp(min=eps)
        factor = bound / g_norm.clamp(min=1e-6)
        g.copy_(torch.where(g_norm > bound, g * factor, g))


@pytest.mark.parametrize("skip_last", [True, False])
def test_agc_leaves_out_the_last_layer_that_ran(skip_last):
    net = _Net()
    ref = copy.deepcopy(net)
    table = LayerTable.build({"": net}, Config())
    x = torch.randn(6, 4)
    for m in (net, ref):
        out = _run_marked(net, table, x) if m is net else ref(x)
        (out.sum() * 100).backward()
    params = [p for p in net.parameters() if p.grad is not None]
    ref_params = [p for p in ref.parameters() if p.grad is not None]
    unclipped = _grads(params)
    opt = torch.optim.SGD(params, lr=0.1)
    spec = "agc:0.01" if skip_last else "agc:0.01,skip_last=false"
    rem = StepRemedies(parse_clip(spec), 0, table, lambda e: None)

    _, result = rem.before_step(opt, _measured(table), None, False, 0)
    last = [id(ref.head.weight), id(ref.head.bias)]
    _agc_oracle([p for p in ref_params if not skip_last or id(p) not in last], 0.01)

    assert result is not None
    changed = set()
    for (name, p), q, g in zip(
        [(n, p) for n, p in net.named_parameters() if p.grad is not None], ref_params, unclipped
    ):
        assert torch.equal(p.grad, q.grad)
        if not torch.equal(p.grad, g):
            changed.add(name)
    # fc1.bias has a ~0 gradient (a BatchNorm follows): below its AGC bound, never clipped
    clipped = {"fc1.weight", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"}
    assert changed == (clipped if skip_last else clipped | {"head.weight", "head.bias"})


# -- UnitRemedies ------------------------------------------------------------------------------


class FakeProbe:
    """The activation probe, reduced to what the unit remedies call."""

    def __init__(
        self, dead: dict[str, torch.Tensor] | None = None, units: dict[str, int] | None = None
    ) -> None:
        self.keep_unit_masks = False
        self.dead = dead or {}
        self.units = units or {}
        self.replaced: list[tuple[str, nn.Module]] = []
        self.reset: list[str] = []

    def replace(self, entry: Any, new: nn.Module) -> None:
        self.replaced.append((entry.name, new))
        entry.module = new  # what the real probe does: the entry follows the swap

    def dead_unit_indices(self, name: str) -> torch.Tensor | None:
        return self.dead.get(name)

    def site_units(self, name: str) -> int | None:
        return self.units.get(name)

    def reset_unit_masks(self, name: str) -> None:
        self.reset.append(name)


def _finding(
    layer: str, kind: str = "dead_units", first: int = 10, last: int = 20, **evidence: Any
) -> dict[str, Any]:
    return {
        "kind": kind,
        "severity": "warning",
        "layer": layer,
        "first_step": first,
        "last_step": last,
        "evidence": {"dead_fraction": 0.5, **evidence},
        "message": f"{layer}: half of the units are dead",
        "suggestion": "try a leaky ReLU",
    }


def _units(
    model: nn.Module,
    probe: FakeProbe,
    swap: str | None = None,
    recycle: bool = False,
    events: list[Event] | None = None,
    patience: int = 10,
) -> UnitRemedies:
    table = LayerTable.build({"": model}, Config())
    for e in table.modules:  # the forward order of an nn.Sequential
        table.mark_executed(e.name)
    return UnitRemedies(
        parse_swap(swap),
        recycle,
        table,
        probe,
        {"": model},  # type: ignore[arg-type]
        events.append if events is not None else (lambda e: None),
        patience,
    )


def test_swap_replaces_the_module_and_returns_the_action_without_editing_the_finding():
    model = _mlp()
    old = model[1]
    x = torch.randn(8, 4)
    pre = model[0](x)
    assert bool((pre < 0).any())  # the swap changes the output (the test can fail)
    probe, events = FakeProbe(), []
    replaced: list[tuple[nn.Module, nn.Module]] = []
    rem = _units(model, probe, swap="relu->leaky_relu:0.1", events=events)
    rem.on_replace = lambda a, b: replaced.append((a, b))
    f = _finding("1")
    given = copy.deepcopy(f)

    actions = rem.on_findings([f], step=20, optimizers=[])

    assert len(actions) == 1 and isinstance(actions[0], Action)
    assert actions[0].finding is f
    record = {
        "remedy": "swap",
        "action": "swapped",
        "step": 20,
        "layer": "1",
        "from": "ReLU",
        "to": "LeakyReLU(negative_slope=0.1)",
        "rule": "relu->leaky_relu:0.1",
        "places": 1,
    }
    assert actions[0].record == record
    assert f == given  # the diagnoser attaches it, not the remedy
    assert type(model[1]) is nn.LeakyReLU and model[1].negative_slope == 0.1
    assert probe.replaced == [("1", model[1])] and replaced == [(old, model[1])]
    assert events == [{"event": "remedy", **record, "finding": "dead_units"}]
    with torch.no_grad():
        expect = model[2](torch.nn.functional.leaky_relu(model[0](x), 0.1))
        assert torch.equal(model(x), expect)
        assert not torch.equal(model(x), model[2](torch.relu(model[0](x))))

    # handled once: the same finding again does nothing, and says nothing
    assert rem.on_findings([f], step=30, optimizers=[]) == []
    # a new finding on the swapped module does not swap it again
    assert rem.on_findings([_finding("1", first=40, last=50)], step=50, optimizers=[]) == []
    assert len(events) == 1 and type(model[1]) is nn.LeakyReLU


def test_swap_on_a_module_that_is_not_a_source_says_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    events: list[Event] = []
    rem = _units(model, FakeProbe(), swap="relu->gelu;sigmoid->relu", events=events)
    f = _finding("1", kind="saturation")
    actions = rem.on_findings([f, _finding("0", kind="exploding_gradients")], 7, [])
    assert len(actions) == 1
    record = actions[0].record
    reason = "swap not applied: 1 is a Tanh, not one of the swap sources (ReLU, Sigmoid)"
    assert record == {"remedy": "swap", "action": "not_applied", "step": 7, "reason": reason}
    assert events == [
        {
            "event": "remedy",
            "remedy": "swap",
            "action": "not_applied",
            "step": 7,
            "layer": "1",
            "reason": reason,
        }
    ]
    assert type(model[1]) is nn.Tanh
    assert rem.on_findings([f], 8, []) == []  # refused once


def test_swap_reaches_the_downstream_dead_sites_of_a_finding():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    rem = _units(model, FakeProbe(), swap="relu->elu")
    f = _finding("1", downstream_dead=["3"])
    actions = rem.on_findings([f], 5, [])
    assert [a.record["layer"] for a in actions] == ["1", "3"]
    assert all(a.finding is f for a in actions)
    assert type(model[1]) is nn.ELU and type(model[3]) is nn.ELU


def test_recycle_reinitialises_exactly_the_dead_units():
    model = half_dead_linear()
    x = torch.rand(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(x).sum().backward()
    opt.step()
    for state in opt.state.values():  # visible moments: every entry 1
        state["exp_avg"].fill_(1.0)
        state["exp_avg_sq"].fill_(1.0)
    lin, head = model[0], model[2]
    w, b, hw, hb = (t.detach().clone() for t in (lin.weight, lin.bias, head.weight, head.bias))
    with torch.no_grad():
        y = model(x)
    dead = torch.tensor([4, 5, 6, 7])
    probe, events = FakeProbe(dead={"1": dead}, units={"1": 8}), []
    rem = _units(model, probe, recycle=True, events=events, patience=10)
    assert probe.keep_unit_masks is True
    f = _finding("1")
    given = copy.deepcopy(f)

    actions = rem.on_findings([f], step=20, optimizers=[opt])

    record = {
        "remedy": "recycle",
        "action": "recycled",
        "step": 20,
        "layer": "1",
        "units": 4,
        "of": 8,
    }
    assert [a.record for a in actions] == [record] and actions[0].finding is f
    assert f == given
    assert events == [{"event": "remedy", **record}]
    assert probe.reset == ["1"]
    # alive units: bit for bit; dead ones: fresh rows (nn.Linear's init, seeded 0), bias 0
    assert torch.equal(lin.weight[:4], w[:4]) and torch.equal(lin.bias[:4], b[:4])
    fresh = torch.empty(8, 4)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lin.weight[4:], fresh[4:]) and not torch.equal(lin.weight[4:], w[4:])
    assert torch.equal(lin.bias[4:], torch.zeros(4))
    # outgoing weights of the dead units zeroed, the rest untouched: the output is unchanged
    assert torch.equal(head.weight[:, :4], hw[:, :4])
    assert torch.equal(head.weight[:, 4:], torch.zeros(2, 4)) and torch.equal(head.bias, hb)
    with torch.no_grad():
        assert torch.equal(model(x), y)
    # optimizer state zeroed for exactly the touched entries
    s_w, s_b, s_hw, s_hb = (opt.state[p] for p in (lin.weight, lin.bias, head.weight, head.bias))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(s_w[key][:4], torch.ones(4, 4))
        assert torch.equal(s_w[key][4:], torch.zeros(4, 4))
        assert torch.equal(s_b[key], torch.tensor([1.0] * 4 + [0.0] * 4))
        assert torch.equal(s_hw[key][:, :4], torch.ones(2, 4))
        assert torch.equal(s_hw[key][:, 4:], torch.zeros(2, 4))
        assert torch.equal(s_hb[key], torch.ones(2))
    assert float(s_w["step"]) == 1.0

    # patience: not again before patience_steps, nor for a finding that has not moved on
    assert rem.on_findings([f], step=25, optimizers=[opt]) == []
    assert rem.on_findings([f], step=40, optimizers=[opt]) == []
    again = rem.on_findings([_finding("1", last=40)], step=40, optimizers=[opt])
    assert [a.record["action"] for a in again] == ["recycled"]


def test_recycle_without_a_consumer_is_refused_once():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    events: list[Event] = []
    probe = FakeProbe(dead={"1": torch.tensor([0])}, units={"1": 8})
    rem = _units(model, probe, recycle=True, events=events, patience=1)
    w = model[0].weight.detach().clone()
    actions = rem.on_findings([_finding("1")], 20, [])
    assert [a.record["action"] for a in actions] == ["not_applied"]
    assert "reads this activation" in actions[0].record["reason"]
    assert events[0]["layer"] == "1" and events[0]["action"] == "not_applied"
    assert torch.equal(model[0].weight, w) and probe.reset == []
    assert rem.on_findings([_finding("1", last=30)], 30, []) == []  # refused once per finding


def test_recycle_with_no_dead_units_or_saturation_does_nothing():
    model = half_dead_linear()
    probe = FakeProbe(dead={"1": torch.tensor([], dtype=torch.long)}, units={"1": 8})
    rem = _units(model, probe, recycle=True)
    assert rem.on_findings([_finding("1")], 20, []) == []
    assert rem.on_findings([_finding("1", kind="saturation")], 20, []) == []  # not dead units


def test_diagnoser_attach_lists_the_action_under_remedies():
    model = _mlp()
    rem = _units(model, FakeProbe(), swap="relu->leaky_relu:0.1")
    f = _finding("1")
    diag = Diagnoser(Thresholds(), lambda finding, new: None)
    for action in rem.on_findings([f], 20, []):
        diag.attach(action.finding, action.record)
    assert f["remedies"] == [
        {
            "remedy": "swap",
            "action": "swapped",
            "step": 20,
            "layer": "1",
            "from": "ReLU",
            "to": "LeakyReLU(negative_slope=0.1)",
            "rule": "relu->leaky_relu:0.1",
            "places": 1,
        }
    ]
    diag.attach(f, {"remedy": "recycle", "action": "not_applied", "step": 21, "reason": "r"})
    assert [r["remedy"] for r in f["remedies"]] == ["swap", "recycle"]


def test_check_model_names_a_swap_source_with_no_module():
    model = _mlp()
    rem = _units(model, FakeProbe(), swap="relu->gelu;tanh->relu")
    (note,) = rem.check_model()
    assert note.startswith("swap='tanh->relu': the model has no nn.Tanh module;")


# -- describe() and Remedies -------------------------------------------------------------------


def test_describe_lists_the_remedies_switched_on():
    assert describe(None, 0, (), False) == {
        "clip": None,
        "guard": None,
        "swap": [],
        "recycle": False,
    }
    assert describe(
        parse_clip("norm:1.0"), 10, parse_swap("relu->leaky_relu:0.1;tanh->relu"), True
    ) == {
        "clip": "norm:max=1,per_layer=false",
        "guard": {"max_skips": 10},
        "swap": ["relu->leaky_relu:0.1", "tanh->relu"],
        "recycle": True,
    }


def test_remedies_package_names_load_lazily():
    assert remedies_pkg.StepRemedies is StepRemedies
    assert remedies_pkg.UnitRemedies is UnitRemedies
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        remedies_pkg.nope  # noqa: B018


def test_remedies_state_dict_and_load():
    table = LayerTable.build({"": _mlp()}, Config())
    off = Remedies(None, None)
    assert off.state_dict() is None
    off.load_state_dict(None)  # nothing saved, nothing on: fine

    clip = StepRemedies(parse_clip("norm:1.0"), 0, table, lambda e: None)
    saved = Remedies(clip, None).state_dict()
    assert (
        saved
        == clip.state_dict()
        == {"clip": "norm:max=1,per_layer=false", "clippers": [], "guard_consecutive": 0}
    )
    with pytest.raises(
        ValueError,
        match=r"saved with clip='norm:max=1,per_layer=false', "
        r"this scope has no remedy",
    ):
        off.load_state_dict(saved)
    # saved without remedies, loaded with a clip: the clip option differs
    with pytest.raises(
        ValueError,
        match=r"saved with clip=None, this scope has "
        r"clip='norm:max=1,per_layer=false'",
    ):
        Remedies(clip, None).load_state_dict(None)

    guard_only = StepRemedies(None, 3, table, lambda e: None)
    assert guard_only.guard is not None
    guard_only.guard.consecutive = 2
    Remedies(guard_only, None).load_state_dict(None)  # a checkpoint from before: count 0
    assert guard_only.guard.consecutive == 0
    Remedies(guard_only, None).load_state_dict(
        {"clip": None, "clippers": [], "guard_consecutive": 1}
    )
    assert guard_only.guard.consecutive == 1


def test_a_guard_only_state_loads_into_a_scope_without_remedies():
    table = LayerTable.build({"": _mlp()}, Config())
    saved = Remedies(StepRemedies(None, 3, table, lambda e: None), None).state_dict()
    assert saved == {"clip": None, "clippers": [], "guard_consecutive": 0}
    Remedies(None, None).load_state_dict(saved)


def test_guard_does_not_skip_huge_finite_gradients_whose_norm_overflows():
    """A float32 norm of finite gradients around 1e20 is inf: the elements decide, and they are
    finite, so the step is not skipped (a NaN norm still skips at once)."""
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 1e20)
    opt = torch.optim.SGD([p], lr=0.0)
    events: list[Any] = []
    guard = StepGuard(2, events.append)
    norms = torch.linalg.vector_norm(p.grad).reshape(1)
    assert torch.isinf(norms).all()  # the overflow
    assert guard.check(opt, norms, 0) is False and p.grad is not None and not events
    # sharded: the ranks decide from the combined norms alone, alike
    assert guard.check(opt, norms, 1, exact=False) is True
    guard.restore(opt)
    p.grad = torch.full((4,), float("nan"))
    assert guard.check(opt, torch.linalg.vector_norm(p.grad).reshape(1), 2) is True
