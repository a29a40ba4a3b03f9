"""The hook set and the hook wrapper on their own, on plain modules and optimizers."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from gradscope.guard import FAULTS_ENV, Deliberate, Guard
from gradscope.hooks import Hook, HookSet, InertHook


@pytest.fixture(autouse=True)
def _no_injected_faults(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)


def _hook_dicts(m: nn.Module) -> dict[str, list[int]]:
    """The handle ids in each of ``m``'s hook dicts, in order. (Modules have no public way to
    list their hooks: the dicts are what torch itself iterates.)"""
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    )
    return {n: list(getattr(m, n)) for n in names}


def _recorder(calls: list[str], name: str):
    def hook(*args, **kwargs):
        calls.append(name)

    return hook


# -- close -----------------------------------------------------------------------------------------
class FakeHandle:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def remove(self) -> None:
        self.log.append(self.name)


def test_close_removes_every_handle_newest_first_and_twice_is_safe():
    log: list[str] = []
    hooks = HookSet()
    for name in ("a", "b", "c"):
        handle = FakeHandle(name, log)
        assert hooks.add(handle, name) is handle  # returned for convenience
    assert len(hooks) == 3
    hooks.close()
    assert log == ["c", "b", "a"]
    assert len(hooks) == 0
    hooks.close()
    assert log == ["c", "b", "a"]


def test_after_close_a_module_has_exactly_its_own_hooks_and_they_still_run_in_order():
    m = nn.Linear(2, 2)
    calls: list[str] = []
    m.register_forward_hook(_recorder(calls, "user-before"))
    m.register_forward_pre_hook(_recorder(calls, "user-pre"))
    before = _hook_dicts(m)
    hooks = HookSet()
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "ours"), "activation")), "activation")
    hooks.add(m.register_forward_pre_hook(Hook(_recorder(calls, "ours-pre"), "pre")), "pre")
    hooks.add(
        m.register_forward_hook(
            Hook(_recorder(calls, "ours-kw"), "kw"), with_kwargs=True, always_call=True
        ),
        "kw",
    )
    hooks.add(m.register_full_backward_hook(Hook(_recorder(calls, "ours-bw"), "bw")), "bw")
    m.register_forward_hook(_recorder(calls, "user-after"))
    x = torch.ones(1, 2, requires_grad=True)  # (a full backward hook wants an input's grad)
    m(x).sum().backward()
    assert calls == [
        "user-pre",
        "ours-pre",
        "user-before",
        "ours",
        "ours-kw",
        "user-after",
        "ours-bw",
    ]
    hooks.close()
    after = _hook_dicts(m)
    user_after = after["_forward_hooks"][-1]
    assert after == {**before, "_forward_hooks": [*before["_forward_hooks"], user_after]}
    calls.clear()
    m(x).sum().backward()
    assert calls == ["user-pre", "user-before", "user-after"]


def test_close_after_the_user_removed_a_handle_is_safe():
    m = nn.Linear(2, 2)
    hooks = HookSet()
    handle = hooks.add(m.register_forward_hook(Hook(lambda *a: None, "activation")), "x")
    handle.remove()
    hooks.close()
    assert len(m._forward_hooks) == 0


# -- detached --------------------------------------------------------------------------------------
def _interleaved():
    """A module with hooks of the user's and of ours, alternating."""
    m = nn.Linear(2, 2)
    calls: list[str] = []
    hooks = HookSet()
    m.register_forward_hook(_recorder(calls, "u1"))
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g1"), "g1")), "g1")
    m.register_forward_hook(_recorder(calls, "u2"))
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g2"), "g2"), with_kwargs=True), "g2")
    m.register_forward_hook(_recorder(calls, "u3"))
    hooks.add(m.register_forward_pre_hook(Hook(_recorder(calls, "gp"), "gp")), "gp")
    return m, hooks, calls


def test_detached_takes_our_hooks_out_and_puts_them_back_in_their_places():
    m, hooks, calls = _interleaved()
    order = _hook_dicts(m)
    m(torch.ones(1, 2))
    assert calls == ["gp", "u1", "g1", "u2", "g2", "u3"]
    ours = {k for k, v in m._forward_hooks.items() if isinstance(v, Hook)}
    with hooks.detached():
        assert not ours & set(m._forward_hooks)
        assert len(m._forward_hooks) == 3 and len(m._forward_pre_hooks) == 0
        assert m._forward_hooks_with_kwargs == {}  # its entry went with the hook
        calls.clear()
        m(torch.ones(1, 2))
        assert calls == ["u1", "u2", "u3"]
    assert _hook_dicts(m) == order
    calls.clear()
    m(torch.ones(1, 2))
    assert calls == ["gp", "u1", "g1", "u2", "g2", "u3"]
    hooks.close()


def test_detached_puts_the_hooks_back_when_the_body_raises():
    m, hooks, calls = _interleaved()
    order = _hook_dicts(m)
    with pytest.raises(RuntimeError, match="pickling failed"), hooks.detached():
        raise RuntimeError("pickling failed")
    assert _hook_dicts(m) == order
    m(torch.ones(1, 2))
    assert calls == ["gp", "u1", "g1", "u2", "g2", "u3"]
    hooks.close()


def test_detached_optimizer_hooks_and_a_user_registered_after():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[str] = []
    hooks = HookSet()
    opt.register_step_pre_hook(_recorder(calls, "u1"))
    hooks.add(opt.register_step_pre_hook(Hook(_recorder(calls, "g"), "optimizer-pre")), "g")
    with hooks.detached():
        opt.register_step_pre_hook(_recorder(calls, "u2"))  # registered while we are out
        opt.step()
        assert calls == ["u1", "u2"]
    calls.clear()
    opt.step()
    assert calls == ["u1", "g", "u2"]  # back in place: its id is older than u2's
    hooks.close()
    calls.clear()
    opt.step()
    assert calls == ["u1", "u2"]


def test_detached_skips_a_handle_the_user_removed():
    m = nn.Linear(2, 2)
    calls: list[str] = []
    hooks = HookSet()
    gone = hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g1"), "g1")), "g1")
    m.register_forward_hook(_recorder(calls, "u1"))
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g2"), "g2")), "g2")
    gone.remove()  # the user removed one of ours (the handle is theirs too)
    with hooks.detached():
        m(torch.ones(1, 2))
        assert calls == ["u1"]
    calls.clear()
    m(torch.ones(1, 2))
    assert calls == ["u1", "g2"]  # the removed one is not resurrected
    hooks.close()
    assert len(m._forward_hooks) == 1


def test_detached_keeps_a_users_prepended_hook_first():
    m = nn.Linear(2, 2)
    calls: list[str] = []
    hooks = HookSet()
    m.register_forward_hook(_recorder(calls, "u1"))
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g"), "g")), "g")
    m.register_forward_hook(_recorder(calls, "u0"), prepend=True)
    m(torch.ones(1, 2))
    assert calls == ["u0", "u1", "g"]
    try:
        with hooks.detached():
            pass
        calls.clear()
        m(torch.ones(1, 2))
        assert calls == ["u0", "u1", "g"]
    finally:
        hooks.close()


def test_detached_restores_the_full_order_of_every_dict_it_touched():
    # prepended hooks of both kinds, ours among them, with the kwargs/always-call dicts keyed too
    m = nn.Linear(2, 2)
    calls: list[str] = []
    hooks = HookSet()
    m.register_forward_hook(_recorder(calls, "u1"), with_kwargs=True)
    hooks.add(
        m.register_forward_hook(
            Hook(_recorder(calls, "g1"), "g1"), with_kwargs=True, always_call=True
        ),
        "g1",
    )
    m.register_forward_hook(_recorder(calls, "u0"), prepend=True, always_call=True)
    hooks.add(
        m.register_forward_hook(Hook(_recorder(calls, "g0"), "g0"), prepend=True, with_kwargs=True),
        "g0",
    )
    m.register_forward_pre_hook(_recorder(calls, "p1"))
    hooks.add(
        m.register_forward_pre_hook(
            Hook(_recorder(calls, "gp"), "gp"), prepend=True, with_kwargs=True
        ),
        "gp",
    )
    order = _hook_dicts(m)
    m(torch.ones(1, 2))
    assert calls == ["gp", "p1", "g0", "u0", "u1", "g1"]
    try:
        with hooks.detached():
            assert len(m._forward_hooks) == 2 and len(m._forward_pre_hooks) == 1
        assert _hook_dicts(m) == order
        calls.clear()
        m(torch.ones(1, 2))
        assert calls == ["gp", "p1", "g0", "u0", "u1", "g1"]
    finally:
        hooks.close()


def test_detached_keeps_a_hook_prepended_while_ours_were_out_first():
    m = nn.Linear(2, 2)
    calls: list[str] = []
    hooks = HookSet()
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g0"), "g0")), "g0")
    m.register_forward_hook(_recorder(calls, "u1"))
    hooks.add(m.register_forward_hook(Hook(_recorder(calls, "g1"), "g1")), "g1")
    try:
        with hooks.detached():
            m.register_forward_hook(_recorder(calls, "first"), prepend=True)
            m.register_forward_hook(_recorder(calls, "last"))
        m(torch.ones(1, 2))
        assert calls == ["first", "g0", "u1", "g1", "last"]
    finally:
        hooks.close()


# -- pickling --------------------------------------------------------------------------------------
def _via_pickle(m):
    return pickle.loads(pickle.dumps(m))


def _via_torch_save(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _plain_twin(m: nn.Linear) -> nn.Linear:
    """The oracle: the same layer with no hooks."""
    plain = nn.Linear(m.in_features, m.out_features)
    plain.load_state_dict(m.state_dict())
    return plain


@pytest.mark.parametrize("clone", [_via_pickle, copy.deepcopy, _via_torch_save])
def test_a_saved_or_copied_hook_is_inert(clone):
    m = nn.Linear(2, 2)
    calls: list[str] = []

    def zeroing(mod, inp, out):  # a local function: cannot be pickled itself
        calls.append("ran")
        return torch.zeros_like(out)  # changes the output, so that running it shows

    guard = Guard(lambda *a: None)
    m.register_forward_hook(Hook(zeroing, "activation", guard, "module-forward"))
    x = torch.tensor([[1.0, -2.0]])
    assert torch.equal(m(x), torch.zeros(1, 2)) and calls == ["ran"]
    twin = clone(m)
    (hook,) = twin._forward_hooks.values()  # no public way to list a module's hooks
    assert type(hook) is InertHook
    expected = _plain_twin(m)(x)
    assert not torch.equal(expected, torch.zeros(1, 2))
    assert torch.equal(twin(x), expected)
    assert calls == ["ran"]  # the twin never called it
    assert hook(1, 2, key=3) is None
    assert type(_via_pickle(hook)) is InertHook


# -- Hook and its guard ----------------------------------------------------------------------------
def _guard():
    told: list[tuple[str, str, str]] = []
    return Guard(lambda where, part, exc: told.append((where, part, repr(exc)))), told


def test_a_hook_returns_what_its_function_returns():
    guard, told = _guard()
    hook = Hook(lambda a, b=0: a + b, "activation", guard, "module-forward")
    assert hook(2, b=3) == 5
    assert Hook(lambda a: a * 2, "plain")(4) == 8  # unguarded
    assert repr(hook) == "<gradscope hook activation>"
    assert told == []


def test_an_error_in_a_guarded_hook_is_swallowed_reported_once_and_switches_its_part_off():
    guard, told = _guard()
    ran: list[int] = []

    def broken(x):
        ran.append(x)
        raise ValueError("bug")

    hook = Hook(broken, "activation", guard, "module-forward")
    sibling = Hook(lambda: "ran", "output-grad", guard, "output-grad")  # the same part
    other = Hook(lambda: "ran", "optimizer-pre", guard, "optimizer-pre")  # the core
    assert hook(1) is None
    assert told == [("module-forward", "activations", "ValueError('bug')")]
    assert hook(2) is None  # off: the function is not called again
    assert ran == [1]
    assert sibling() is None
    assert other() == "ran"
    assert told == [("module-forward", "activations", "ValueError('bug')")]


def test_an_error_in_the_core_stops_every_measuring_hook():
    guard, told = _guard()
    core = Hook(lambda: 1 / 0, "optimizer-pre", guard, "optimizer-pre")
    activation = Hook(lambda: "ran", "activation", guard, "module-forward")
    tracer = Hook(lambda: "ran", "tracer", guard, "tracer-forward")
    assert core() is None
    assert activation() is None and tracer() is None
    assert [t[:2] for t in told] == [("optimizer-pre", "core")]


def test_a_hook_on_a_module_that_raises_leaves_the_forward_as_it_was():
    guard, told = _guard()
    m = nn.Linear(2, 2)
    m.register_forward_hook(Hook(lambda *a: {}["missing"], "activation", guard, "module-forward"))
    x = torch.ones(1, 2)
    expected = _plain_twin(m)(x)
    assert torch.equal(m(x), expected)
    assert torch.equal(m(x), expected)
    assert told == [("module-forward", "activations", "KeyError('missing')")]


def test_an_injected_fault_is_reported_like_an_error(monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, "module-forward")
    guard, told = _guard()
    ran: list[str] = []
    hook = Hook(lambda: ran.append("ran"), "activation", guard, "module-forward")
    other = Hook(lambda: "ran", "tracer", guard, "tracer-forward")
    assert hook() is None
    assert ran == []  # the fault fires before the function
    assert told == [
        ("module-forward", "activations", "InjectedFault('injected fault in module-forward')")
    ]
    assert other() == "ran"


class Stop(Deliberate):
    pass


@pytest.mark.parametrize("exc", [Stop("guard remedy"), KeyboardInterrupt()])
def test_deliberate_exceptions_and_keyboard_interrupt_pass_through(exc):
    guard, told = _guard()
    calls: list[int] = []

    def raises():
        calls.append(1)
        raise exc

    hook = Hook(raises, "optimizer-pre", guard, "optimizer-pre")
    for _ in range(2):
        with pytest.raises(type(exc)):
            hook()
    assert calls == [1, 1]  # the part is still on: nothing went wrong in gradscope
    assert told == [] and guard.off == set()


def test_a_hook_without_a_guard_raises():
    hook = Hook(lambda: 1 / 0, "self-guarded")
    with pytest.raises(ZeroDivisionError):
        hook()
    with pytest.raises(ZeroDivisionError):
        hook()
