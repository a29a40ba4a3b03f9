"""Which module produced the first NaN/Inf: a tracer armed by a cheap per-step flag.

The flag costs nothing new: the gradient norms are computed anyway, and a sum of norms is finite
iff every gradient element is (read on the host where tensors live on the CPU; on accelerators at
flush time). The loss is checked too where reading it is free (CPU). On the first hit (mode
``"auto"``), or from step 0 (``"always"``), the tracer hooks every module of the watched models:

* forward: a forward hook checks each output; the culprit is the first module (in completion
  order, so the innermost) whose output is non-finite while its inputs are finite. If its own
  parameters are non-finite, the optimizer put them there (phase ``optimizer``), or, when
  gradients were already non-finite earlier, the weights were poisoned by that earlier update;
* backward: tensor hooks on each module's outputs and inputs see the gradient with respect to
  them; the culprit is the module whose input gradient is non-finite while the gradients
  arriving at its outputs were finite. A non-finite gradient arriving at a module's *output* came
  from code outside any module (the loss, a functional op). Inf counts as much as NaN (anomaly
  mode checks backward outputs for NaN only and misses an Inf from sqrt at 0; docs/comparison.md,
  "Where a NaN/Inf was made").

Checks are ``isfinite(t.sum())`` (one reduction; a sum of huge finite values that overflows is
re-checked element-wise). Where tensors live on the CPU the verdicts are read at once, and the
inputs are examined only when an output is bad. On accelerators the flags stay on the device and
are read once at the end of each backward pass while the tracer is armed (one sync per step,
only after a non-finite value was seen, or always with ``"always"``).

Once the culprit is named the tracer disarms: its hooks come off and the cost goes back to zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..guard import Guard
from ..hooks import Hook, HookSet
from ..layers import ROOT
from . import numerics
from .culprit import (
    _dtype,
    _FwdCall,
    _GradEvent,
    backward_verdict,
    bad_data_info,
    bad_loss_info,
    deferred_forward_info,
    forward_info,
)

if TYPE_CHECKING:
    pass

Report = Callable[[dict[str, Any]], None]
ARMED_STEPS = 100
"""In ``auto`` mode, backward passes traced after a flag before the tracer gives up (and comes
off, until the next flag): a non-finite value that does not recur costs nothing for long."""


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Floating-point tensors in a module's inputs or outputs (tuples, lists, dicts, 2 deep)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel():
            yield obj
    elif depth < 2 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _bad_flag(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on the tensor's device: does ``t`` hold a NaN/Inf? (exact)"""
    t = t.detach()
    quick = torch.isfinite(numerics.total(t))
    return torch.logical_not(quick) & torch.logical_not(torch.isfinite(t).all())


def _is_bad(t: torch.Tensor) -> bool:
    """Host verdict (CPU tensors): one sum, an element-wise check only if the sum is not
    finite (NaN/Inf, or an overflow of huge finite values)."""
    t = t.detach()
    if bool(torch.isfinite(numerics.total(t))):
        return False
    return not bool(torch.isfinite(t).all())


@dataclass
class _StepState:
    forward_done: bool = False
    watched: bool = False  # the tracer saw this step's forward (armed before it ran)
    bad_input_at: str | None = None  # first module whose inputs were already non-finite
    calls: list[_FwdCall] = field(default_factory=list)
    grads: list[_GradEvent] = field(default_factory=list)


class NonfiniteTracer:
    """Forward and gradient checks on every module, while armed.

    Args:
        models: ``{prefix: model}`` as the Scope watches them.
        mode: ``"auto"`` (arm on the first flag), ``"always"`` (armed from the start) or
            ``"off"``.
        immediate: Read verdicts on the host at once (tensors on the CPU).
        report: Called with the culprit's description when one is named.
        step: Returns the current step number.
        guard: Runs every hook (an error switches the tracer off).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        mode: str,
        immediate: bool,
        report: Report,
        step: Callable[[], int],
        guard: Guard | None = None,
    ) -> None:
        self.guard = guard
        self.mode = mode
        self.immediate = immediate
        self._report = report
        self._step = step
        self._named: list[tuple[str, nn.Module]] = []
        self._seen: set[int] = set()
        for prefix, model in models.items():
            self._add(prefix, model)
        self.hooks = HookSet()
        self.armed = False
        self.done = False  # the culprit is named; nothing left to trace
        self.first_flag_step: int | None = None
        self._armed_steps = 0
        self._state = _StepState()
        self._replaying = False
        self._was_armed = False
        self.held: dict[str, Any] | None = None  # a replay's verdict, until it is accepted
        if mode == "always":
            self.arm()

    def _add(self, prefix: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
        added = []
        for raw, module in model.named_modules():
            if id(module) in self._seen:
                continue
            self._seen.add(id(module))
            name = f"{prefix}.{raw}" if prefix and raw else (prefix or raw)
            added.append((name or ROOT, module))
        self._named.extend(added)
        return added

    def traced_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module the tracer checks when armed."""
        return list(self._named)

    def add_model(self, prefix: str, model: nn.Module) -> None:
        """Trace the modules of a model found later in the run (hooked now if armed)."""
        added = self._add(prefix, model)
        if self.armed:
            self._hook(added)

    # -- arming ---------------------------------------------------------------------------------
    def flag(self, step: int) -> None:
        """A non-finite value was seen at ``step`` (cheap check): arm, unless done or off."""
        if self.first_flag_step is None or step < self.first_flag_step:
            self.first_flag_step = step
        if self.mode != "off" and not self.done:
            self.arm()

    def arm(self) -> None:
        if self.armed or self.done:
            return
        self.armed = True
        self._armed_steps = 0
        self._hook(self._named)

    def _hook(self, named: list[tuple[str, nn.Module]]) -> None:
        for name, module in named:
            hook = Hook(
                partial(self._on_forward, name), f"trace {name}", self.guard, "tracer-forward"
            )
            self.hooks.add(module.register_forward_hook(hook, with_kwargs=True), "trace")

    def replace_module(self, old: nn.Module, new: nn.Module) -> None:
        """An activation swap put ``new`` where ``old`` was: trace the new one (re-hooked now
        if armed; swaps happen between steps)."""
        self._named = [(n, new if m is old else m) for n, m in self._named]
        if self.armed:
            steps = self._armed_steps
            self.disarm()
            self.arm()
            self._armed_steps = steps

    def begin_replay(self) -> None:
        """A replay of this step's forward calls begins (:mod:`gradscope.probes.replay`): arm
        for it, with a fresh step state."""
        self._replaying = True
        self._was_armed = self.armed
        self.arm()
        self._state = _StepState()

    def end_replay(self, faithful: bool) -> None:
        """The replay ended. Its verdict stands only if it was ``faithful`` (the replayed
        outputs equal the original ones: the same computation ran); otherwise the tracer is
        as it was before the replay."""
        self._replaying = False
        self._state = _StepState()
        held, self.held = self.held, None
        if held is not None and faithful:
            self._finish(held)
        elif self.armed and not self._was_armed:
            self.disarm()

    def disarm(self) -> None:
        self.armed = False
        self.hooks.close()
        self._state = _StepState()

    def close(self) -> None:
        self.disarm()
        self._named.clear()
        self._seen.clear()

    # -- forward ----------------------------------------------------------------------------------
    def _on_forward(
        self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any
    ) -> None:
        # a replay checks no-grad regions too (a reentrant checkpoint runs its block so)
        if not self.armed or (not torch.is_grad_enabled() and not self._replaying):
            return
        st = self._state
        st.watched = True
        outs = list(_tensors(output))
        if not outs:
            return
        cls = type(module).__name__
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        if self.immediate:
            if not st.forward_done and any(_is_bad(t) for t in outs):
                if not any(_is_bad(t) for t in ins):
                    st.forward_done = True
                    self._forward_culprit(name, module, ins, outs)
                elif st.bad_input_at is None:
                    st.bad_input_at = name
        else:
            out_bad = torch.stack([_bad_flag(t) for t in outs]).any()
            in_bad = torch.stack([_bad_flag(t) for t in ins]).any() if ins else None
            st.calls.append(_FwdCall(name, cls, out_bad, in_bad, module, _dtype(outs[0])))
        if st.forward_done:
            return  # the forward culprit of this step is known: its NaN reaches every gradient
        for which, group in (("out", outs), ("in", ins)):
            for t in group:
                if t.requires_grad:
                    hook = Hook(
                        partial(self._on_grad, id(t), name, cls, which),
                        f"trace-grad {name}",
                        self.guard,
                        "tracer-grad",
                    )
                    t.register_hook(hook)  # type: ignore[no-untyped-call]

    def _forward_culprit(
        self, name: str, module: nn.Module, ins: list[torch.Tensor], outs: list[torch.Tensor]
    ) -> None:
        self._finish(forward_info(self._step(), name, module, ins, outs, self.first_flag_step))

    # -- backward ---------------------------------------------------------------------------------
    def _on_grad(self, key: int, name: str, cls: str, which: str, grad: torch.Tensor) -> None:
        if not self.armed or self._state.forward_done or self.held is not None:
            return
        if self.immediate:
            bad = _is_bad(grad)
            self._state.grads.append(
                _GradEvent(key, name, cls, which, bad, grad.detach() if bad else None)
            )
        else:
            self._state.grads.append(_GradEvent(key, name, cls, which, _bad_flag(grad)))

    def after_backward(self, loss: torch.Tensor | None = None) -> None:
        """A backward pass ended: name the culprit from this step's checks, if any. ``loss``
        (what backward started from) tells a loss function that overflowed on finite model
        outputs."""
        if not self.armed or self.held is not None:
            return
        st = self._state
        self._state = _StepState()
        if not st.watched:
            return  # armed during this step, after its forward: nothing to conclude from it
        if not self._replaying:
            self._armed_steps += 1
        if self.mode == "auto" and self._armed_steps > ARMED_STEPS:
            self.disarm()  # it did not recur: stop paying for the hooks (a new flag re-arms)
            return
        if not self.immediate:
            self._resolve_deferred(st, loss)
        elif st.bad_input_at is not None:
            self._bad_data(st.bad_input_at)
        elif loss is not None and loss.is_floating_point() and _is_bad(loss):
            self._bad_loss(loss)
        else:
            self._resolve_backward(st.grads)

    def saw_forward(self) -> bool:
        """This step's forward ran under the tracer's hooks with no input already bad."""
        return self._state.watched and self._state.bad_input_at is None

    def bad_output_gradient(self, output_max_abs: float, loss: torch.Tensor | None = None) -> None:
        """A replay (:mod:`gradscope.probes.replay`): every module's output was finite and the
        gradient that arrived at the model's output (or the ``loss``) was not: the loss made
        it."""
        info = bad_loss_info(self._step(), loss)
        info["output_max_abs"] = output_max_abs
        self._finish(info)

    def _bad_loss(self, loss: torch.Tensor) -> None:
        self._finish(bad_loss_info(self._step(), loss))

    def _bad_data(self, module: str) -> None:
        self._finish(bad_data_info(self._step(), module))

    def end_step(self) -> None:
        """A step ended without a backward pass seen by the tracer (nothing to resolve)."""
        if self.armed and not self.immediate and (self._state.calls or self._state.grads):
            st = self._state
            self._state = _StepState()
            self._resolve_deferred(st)

    def _resolve_deferred(self, st: _StepState, loss: torch.Tensor | None = None) -> None:
        """Accelerators: read every flag of the step at once (one transfer), then decide."""
        flags: list[torch.Tensor] = []
        for call in st.calls:
            flags.append(call.out_bad.reshape(1))
            flags.append(
                (
                    call.in_bad
                    if call.in_bad is not None
                    else torch.zeros((), dtype=torch.bool, device=call.out_bad.device)
                ).reshape(1)
            )
        flags.extend(ev.bad.reshape(1) for ev in st.grads)
        check_loss = loss is not None and loss.is_floating_point()
        if check_loss:
            assert loss is not None
            flags.append(_bad_flag(loss).reshape(1))
        if not flags:
            return
        host = torch.cat([f.to("cpu", non_blocking=False) for f in flags]).tolist()
        n = len(st.calls)
        for i, call in enumerate(st.calls):
            if host[2 * i] and host[2 * i + 1]:
                self._bad_data(call.module)
                return
            if host[2 * i] and not host[2 * i + 1]:
                self._finish(deferred_forward_info(self._step(), call, self.first_flag_step))
                return
        if check_loss and host[-1]:
            assert loss is not None
            self._bad_loss(loss)
            return
        for j, ev in enumerate(st.grads):
            ev.bad = bool(host[2 * n + j])
        self._resolve_backward(st.grads)

    def _grads_nonfinite(self) -> bool:
        """Whether some parameter gradient is non-finite (rare path: only after a non-finite
        gradient was seen on an activation)."""
        for _, module in self._named:
            for p in module.parameters(recurse=False):
                g = p.grad
                if (
                    g is not None
                    and g.is_floating_point()
                    and not g.is_sparse
                    and not bool(torch.isfinite(g).all())
                ):
                    return True
        return False

    def _resolve_backward(self, events: list[_GradEvent]) -> None:
        first_bad = next((i for i, ev in enumerate(events) if ev.bad), None)
        if first_bad is None:
            return
        if not self._grads_nonfinite():
            # e.g. sqrt'(0) = inf behind a ReLU that was off: threshold_backward writes 0 there,
            # so no parameter gradient is affected. Not a pathology; keep tracing.
            return
        self._finish(backward_verdict(events, first_bad, self._step()))

    def _finish(self, info: dict[str, Any]) -> None:
        # how it was named: live, as the step ran (the tracer was armed), or by a replay of the
        # step's forward calls before the optimizer step
        info.setdefault("attributed", "replayed" if self._replaying else "traced")
        if self._replaying:  # held until the replay is known to be faithful
            self.held = info
            self._state.forward_done = True  # nothing more to check in this replay
            return
        self.done = True
        self.disarm()
        self._report(info)
