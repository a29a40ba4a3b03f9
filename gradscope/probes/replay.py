"""Replay on detection: name the module that made the first NaN/Inf on the step it happened.

The tracer (:mod:`gradscope.probes.nonfinite`) hooks every module only once armed, and the
cheap per-step flag that arms it is read after the backward pass: by then the step that made the
first non-finite value is over, and its NaN has usually poisoned the weights, so it never recurs
on clean weights for the armed tracer to see. Replay closes that gap where the flag is known on
the host before the optimizer steps (tensors on the CPU: the gradient probe reads it at the
optimizer's pre-step hook, when the weights are still the finite ones that produced the NaN):

* every training forward call of a watched root model keeps, for one step, its inputs (by
  reference), the CPU random-number state at its start, and a reference to the gradient that
  arrived at its outputs in the backward pass;
* on a flagged step, before the optimizer step, each kept call is run again with the tracer
  armed: the same inputs, the same random numbers (dropout), then a backward pass from the kept
  output gradient (``torch.autograd.grad`` towards the parameters, so no ``.grad`` changes);
* then everything the replay touched is put back: the random-number state, every buffer of the
  watched models (BatchNorm's running statistics and counters), and gradscope's own activation
  records (the replay is not a step). The optimizer step then proceeds as it would have (or the
  ``guard=`` remedy skips it).

What a replay cannot reproduce (the culprit is then named as before, by the armed tracer on a
later step, or inferred from the records): Python control flow that depends on state a forward
changed (a counter in ``forward``), side effects of user hooks (they run again), inputs the
script changed in place after the forward, and random numbers drawn from a generator other than
the default CPU one. The cost on clean steps: two hooks on each root model and one copy of the
RNG state (5 KB) per forward call; nothing is read on the host. On accelerators nothing is kept
(knowing before the step would need a host read per step: ``docs/costs.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..compat import cpu_autocast, is_compiling
from ..hooks import Hook, HookSet
from .nonfinite import _tensors
from .ops import OpWatch

if TYPE_CHECKING:
    from ..guard import Guard
    from .activations import ModuleProbe
    from .nonfinite import NonfiniteTracer


MAX_CALLS = 32
"""Forward calls kept in one step. A step with more (gradient accumulation over more
micro-batches, or loops that call backward without ever stepping) keeps none and is not
replayed: the tracer then arms at the flag, as without replay."""


@dataclass
class _Call:
    """One training forward call of a root model, kept for one step."""

    module: nn.Module  # what the replay runs (eagerly)
    caller: nn.Module  # what the user called (a compiled wrapper, or the module itself)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: torch.Tensor
    autocast: torch.dtype | None  # CPU autocast's dtype where the original ran under it
    outputs: list[torch.Tensor] | None = None  # detached views (no copy): the fidelity check
    grads: list[torch.Tensor | None] | None = None  # at the outputs that require grad


class StepReplay:
    """Keeps the current step's forward calls of the root models; replays them on a flag.

    Args:
        models: ``{prefix: model}`` as the Scope watches them (the roots).
        tracer: The NaN tracer (armed for the replay).
        probe: The activation probe (paused during the replay: it is not a step).
        guard: Runs the hooks (an error switches the tracer off, with the replay).
        callers: ``torch.compile`` wrappers the user calls, by the id of the module each runs:
            their own hooks run eagerly (the module's run inside the compiled graph), so calls
            are kept there; the replay runs the module itself, eagerly, and compares its
            outputs with a tolerance (a compiled graph may round differently).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        tracer: NonfiniteTracer,
        probe: ModuleProbe,
        guard: Guard | None = None,
        callers: Mapping[int, nn.Module] | None = None,
    ) -> None:
        self.tracer = tracer
        self.callers = dict(callers or {})
        self.probe = probe
        self.guard = guard
        self.hooks = HookSet()
        self.calls: list[_Call] = []
        self.replays = 0
        self.failed = 0  # replays the user's code refused (they name nothing)
        self._roots: list[nn.Module] = []
        self._active = False  # replaying: the hooks keep nothing
        self._full = False  # this step had more calls than MAX_CALLS: not replayable
        for model in models.values():
            self.add_model(model)

    @property
    def wanted(self) -> bool:
        """Whether keeping calls can still serve: the tracer is on, has not named its culprit,
        and verdicts are read on the host at once (the CPU)."""
        tracer = self.tracer
        return tracer.immediate and not tracer.done and tracer.mode == "auto"

    def add_model(self, model: nn.Module) -> None:
        if any(model is m for m in self._roots):
            return
        self._roots.append(model)
        caller = self.callers.get(id(model), model)  # where the user's call is seen eagerly
        pre = Hook(partial(self._on_pre, model), "replay-keep", self.guard, "tracer-forward")
        post = Hook(self._on_post, "replay-keep", self.guard, "tracer-forward")
        self.hooks.add(caller.register_forward_pre_hook(pre, with_kwargs=True), "replay")
        self.hooks.add(caller.register_forward_hook(post), "replay")

    # -- keeping (every forward call: cheap) ---------------------------------------------------
    def _on_pre(self, model: nn.Module, module: nn.Module, args: Any, kwargs: Any) -> None:
        if (
            self._active
            or self._full
            or not torch.is_grad_enabled()
            or not self.wanted
            or is_compiling()
        ):
            return
        if len(self.calls) >= MAX_CALLS:  # a step that never ends (input-gradient loops)
            self.calls.clear()
            self._full = True
            return
        self.calls.append(
            _Call(
                model,
                module,
                args,
                dict(kwargs),
                torch.get_rng_state(),
                cpu_autocast(),
            )
        )

    def _on_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active or not self.calls or not torch.is_grad_enabled():
            return
        call = self.calls[-1]
        if call.caller is not module or call.outputs is not None:
            return
        tensors = list(_tensors(output))
        call.outputs = [t.detach() for t in tensors]
        outs = [t for t in tensors if t.requires_grad]
        call.grads = [None] * len(outs)
        for i, t in enumerate(outs):  # the gradients, not the outputs: the graph is not kept
            t.register_hook(partial(_keep_grad, call.grads, i))  # type: ignore[no-untyped-call]

    def clear(self) -> None:
        """The step ended: nothing of it outlives it."""
        self.calls.clear()
        self._full = False

    # -- replaying (a flagged step only) -------------------------------------------------------
    def replay(self, loss: torch.Tensor | None = None) -> bool:
        """Run this step's forward calls again with the tracer armed, then put back what they
        touched. ``loss``: the non-finite loss of the last call's backward, if that is what was
        flagged (a loss over finite outputs). Returns whether the tracer named a culprit."""
        calls, self.calls = self.calls, []
        tracer = self.tracer
        if not calls or not self.wanted:
            return False
        self.replays += 1
        rng = torch.get_rng_state()
        buffers = [(b, b.detach().clone()) for m in self._roots for b in m.buffers()]
        sampling, seen = self.probe.sampling, self.probe.forward_seen
        self.probe.sampling = False
        self._active = True
        tracer.begin_replay()
        faithful = True
        ops = OpWatch()
        try:
            for call in calls:
                torch.set_rng_state(call.rng)
                with (
                    torch.enable_grad(),
                    torch.autocast(
                        "cpu",
                        dtype=call.autocast or torch.bfloat16,
                        enabled=call.autocast is not None,
                    ),
                    ops,
                ):  # the operation behind a forward culprit (once per flag)
                    out = _user_code(call.module, *call.args, **call.kwargs)
                if out is _FAILED:
                    faithful, self.failed = False, self.failed + 1
                    break
                if not _same(list(_tensors(out)), call.outputs, exact=call.caller is call.module):
                    faithful = False  # another computation ran (state, in-place inputs)
                    break
                if tracer.held is not None:
                    break
                clean = tracer.saw_forward()
                if clean and any(
                    g is not None and not bool(torch.isfinite(g).all()) for g in call.grads or ()
                ):
                    # finite outputs, a non-finite gradient from the loss
                    tracer.bad_output_gradient(_max_abs(list(_tensors(out))))
                    break
                outs = [t for t in _tensors(out) if t.requires_grad]
                pairs = [(o, g) for o, g in zip(outs, call.grads or ()) if g is not None]
                params = [p for p in call.module.parameters() if p.requires_grad]
                if (
                    pairs
                    and params
                    and _user_code(
                        torch.autograd.grad,
                        [o for o, _ in pairs],
                        params,
                        grad_outputs=[g for _, g in pairs],
                        allow_unused=True,
                    )
                    is _FAILED
                ):
                    faithful, self.failed = False, self.failed + 1
                    break
                tracer.after_backward(None)
                if tracer.held is not None:
                    break
                if clean and loss is not None and call is calls[-1]:
                    tracer.bad_output_gradient(_max_abs(list(_tensors(out))), loss)
            held = tracer.held
            if held is not None and held.get("phase") == "forward" and ops.first is not None:
                held["op"] = ops.first
        finally:
            tracer.end_replay(faithful)
            self._active = False
            self.probe.sampling, self.probe.forward_seen = sampling, seen
            torch.set_rng_state(rng)
            with torch.no_grad():
                for b, value in buffers:
                    b.copy_(value)
        return tracer.done

    def close(self) -> None:
        self.hooks.close()
        self.calls.clear()
        self._roots.clear()


_FAILED = object()


def _user_code(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The user's forward (or a backward through it) run again: an error there is the replay
    not reproducing the step (``torch.autograd.grad`` through a reentrant checkpoint, inputs an
    iterator consumed...), not a fault of gradscope's: the replay names nothing and the tracer
    arms as without it. ``KeyboardInterrupt`` and ``SystemExit`` pass."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        return _FAILED


def _max_abs(ts: list[torch.Tensor]) -> float:
    return max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)


def _same(new: list[torch.Tensor], old: list[torch.Tensor] | None, exact: bool = True) -> bool:
    """The replayed outputs equal the original ones: element for element (NaN where NaN), or,
    not ``exact`` (the original ran compiled), NaN and Inf in the same places and the finite
    values within a rounding tolerance."""
    if old is None or len(new) != len(old):
        return False
    for a, b in zip(new, old):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        a = a.detach()
        if exact:
            if not bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()):
                return False
            continue
        if not torch.equal(torch.isnan(a), torch.isnan(b)) or not torch.equal(
            torch.isinf(a) & (a > 0), torch.isinf(b) & (b > 0)
        ):
            return False
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.allclose(a[finite].double(), b[finite].double(), rtol=1e-3, atol=1e-5):
            return False
    return True


def _keep_grad(grads: list[torch.Tensor | None], i: int, grad: torch.Tensor) -> None:
    """The gradient that arrived at a root output (kept by reference; not changed)."""
    grads[i] = grad
