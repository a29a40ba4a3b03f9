"""The step clock: which training moment ends a step, and where gradients are read.

A *step* is an optimizer step. The clock hears four kinds of moments (optimizer step pre/post
hooks, the start and end of each backward pass, GradScaler's skipped steps, and explicit
``Scope.step()`` calls) and turns them into rows of the step buffer:

* **optimizer mode** (an optimizer steps the watched parameters): gradients are read in the
  optimizer's pre-step hook, so they are final (accumulated, all-reduced, unscaled); weights are
  snapshotted there and compared in the post-step hook. A step ends when every optimizer known to
  step these parameters has stepped once (a GAN's D then G), or when one steps again.
* **backward mode** (no optimizer; ``w -= lr * w.grad`` by hand): each backward pass is a step.
  Gradients are read when the backward pass returns; the step closes when the next one starts
  (or on ``close()``), after the hand-written update, so the update ratio sees it.
* **manual mode** (``Scope.step()`` called): steps end only there.

Until an optimizer has been seen, ``auto`` cannot tell gradient accumulation (several backward
passes, then one ``optimizer.step()``) from a hand-written loop. It treats backward passes as one
open step and looks for evidence of an update between them: a parameter's version counter moved,
its gradient was reset, or (for loops that update through ``.data``, which no counter sees) its
value changed, compared on one small parameter. An optimizer step settles it the other way.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .layers import LayerTable, ParamSlot

if TYPE_CHECKING:
    from .config import StepOn

AUTO, OPTIMIZER, BACKWARD, MANUAL = "auto", "optimizer", "backward", "manual"


class Recorder(Protocol):
    """What the clock drives (implemented by Scope)."""

    def open_row(self, step: int) -> None: ...
    def reopen_row(self, step: int, drop_current: bool) -> bool: ...
    def discard_row(self) -> None: ...
    def record_grads(
        self,
        slots: Sequence[ParamSlot],
        grad_scale: Any = None,
        known_nonfinite: bool = False,
        at_backward: bool = False,
    ) -> Any: ...
    def before_update(self, opt: torch.optim.Optimizer, measured: Any, grad_scale: Any) -> bool: ...
    def after_update(self, opt: torch.optim.Optimizer) -> None: ...
    def snapshot_weights(self, slots: Sequence[ParamSlot]) -> None: ...
    def update_weights(self) -> None: ...
    def cancel_weights(self) -> None: ...
    def end_window(self) -> None: ...
    def commit_row(self) -> None: ...
    def set_sampling(self, sampled: bool) -> None: ...
    def note_loss(self, loss: torch.Tensor) -> None: ...
    def note_skipped(self, value: torch.Tensor | float) -> None: ...
    def note_scale(self, scale: torch.Tensor) -> None: ...


class Clock:
    """Decides step boundaries; see the module docstring.

    Args:
        table: The watched parameters.
        recorder: Receives the row-level actions.
        step_on: ``Config.step_on`` (``auto``/``optimizer``/``backward``).
        every: ``Config.activation_every``: steps with activation statistics.
        update_every: ``Config.update_every`` resolved: steps with update ratios.
        explicit_optimizers: Optimizers passed to ``watch``; when given, only they count.
    """

    def __init__(
        self,
        table: LayerTable,
        recorder: Recorder,
        step_on: StepOn,
        every: int,
        update_every: int,
        explicit_optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> None:
        self.table = table
        self.rec = recorder
        self.forced = step_on != AUTO
        self.mode: str = step_on  # and "manual" once Scope.step() is called
        self.every = every
        self.update_every = update_every
        self.step = 0  # index of the current (open or next) step
        self.row_open = False
        # backward passes and optimizer steps seen, ever: a notebook cell trained the model if
        # this moved (in backward mode a step stays open between steps, so row_open cannot say)
        self.moments = 0
        self._explicit = {id(o) for o in explicit_optimizers}
        self._known: set[int] = set()  # optimizers that step watched parameters
        self._stepped: set[int] = set()  # ... and have stepped in the current step
        self._slots: dict[int, tuple[weakref.ref[Any], tuple[int, ...], list[ParamSlot]]] = {}
        self._backwards = 0  # backward passes in the current step
        self._in_step: int | None = None  # optimizer whose step() is running
        self._closure_pending: int | None = None  # closure step: read grads at 1st backward
        self._closure_loss_taken = False
        self._evidence: tuple[ParamSlot, int, int, torch.Tensor] | None = None
        self._update_seen = False
        self._ended_by_optimizer = False

    # -- helpers ------------------------------------------------------------------------------
    def sampled(self, step: int | None = None) -> bool:
        """Whether activation statistics are taken at ``step`` (default: the current one)."""
        return (self.step if step is None else step) % self.every == 0

    def sampled_updates(self) -> bool:
        """Whether update ratios, weight norms and max-abs gradients are taken now."""
        return self.step % self.update_every == 0

    def slots_for(self, opt: torch.optim.Optimizer) -> list[ParamSlot]:
        """The watched parameters ``opt`` steps (cached; refreshed if its groups change)."""
        if self._explicit and id(opt) not in self._explicit:
            return []
        sig = tuple(len(g["params"]) for g in opt.param_groups)
        cached = self._slots.get(id(opt))
        if cached is not None and cached[0]() is opt and cached[1] == sig:
            return cached[2]
        slots = self.table.slots_of(p for g in opt.param_groups for p in g["params"])
        self._slots[id(opt)] = (weakref.ref(opt), sig, slots)
        return slots

    def forget_slots(self) -> None:
        """The table grew (a model joined the run): map optimizers to slots afresh."""
        self._slots.clear()

    @property
    def in_optimizer_step(self) -> bool:
        """Inside an optimizer's ``step()`` (a closure's backward, a step hook)."""
        return self._in_step is not None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers seen stepping the watched parameters (still alive)."""
        out = []
        for key, (ref, _, _) in self._slots.items():
            opt = ref()
            if opt is not None and key in self._known:
                out.append(opt)
        return out

    def _ensure_row(self) -> None:
        if not self.row_open:
            self.rec.open_row(self.step)
            self.row_open = True

    def commit(self, end_window: bool = True) -> None:
        """Close the current step (if one is open) and move to the next.

        Args:
            end_window: Whether what was measured since the last backward pass belongs to this
                step. Not when the step is closed by the *next* backward pass: the forward that
                led to it is already the next step's.
        """
        if not self.row_open:
            return
        self.rec.update_weights()
        if end_window:
            self.rec.end_window()
        self.row_open = False
        self.rec.commit_row()
        self.step += 1
        self._stepped.clear()
        self._backwards = 0
        self._evidence = None
        self.rec.set_sampling(self.sampled())
        self._ended_by_optimizer = False

    def _discovering(self, opt: torch.optim.Optimizer) -> bool:
        """A second optimizer of these parameters shows up for the first time, right after the
        step that the others ended (a GAN's first iteration: D stepped, now G)."""
        return (
            self.mode == OPTIMIZER
            and self._ended_by_optimizer
            and not self._stepped
            and bool(self._known)
            and id(opt) not in self._known
        )

    def _reopen(self) -> None:
        """Put the step just ended back in progress: it was not complete after all. What was
        measured since (the new optimizer's forward and backward) joins it."""
        if self.rec.reopen_row(self.step - 1, drop_current=self.row_open):
            self.step -= 1
            self.row_open = True
            self._stepped = set(self._known)
            self.rec.set_sampling(self.sampled())

    def _grads_at_backward(self) -> bool:
        return self.mode == BACKWARD or (self.mode in (AUTO, MANUAL) and not self._known)

    # -- optimizer moments --------------------------------------------------------------------
    def _enter(self, opt: torch.optim.Optimizer) -> None:
        """``opt`` is stepping (or GradScaler skipped its step): settle which step that is."""
        if self.mode in (AUTO, BACKWARD):
            self.mode = OPTIMIZER
        if self.mode == OPTIMIZER and id(opt) in self._stepped:
            self.commit()  # this optimizer stepped again: a new step began
        elif self._discovering(opt):
            self._reopen()
        self._ensure_row()
        self._known.add(id(opt))
        self._stepped.add(id(opt))

    def _counted(self, opt: torch.optim.Optimizer) -> list[ParamSlot]:
        """The watched parameters ``opt`` steps, if its steps count (not when forced to count
        backward passes)."""
        return [] if self.mode == BACKWARD and self.forced else self.slots_for(opt)

    def _end_if_complete(self) -> None:
        """Every known optimizer has stepped: the step is complete."""
        if self.mode == OPTIMIZER and self._stepped >= self._known:
            self.commit()
            self._ended_by_optimizer = True

    def optimizer_pre(self, opt: torch.optim.Optimizer, closure: bool) -> None:
        slots = self._counted(opt)
        if not slots:
            return
        self.moments += 1
        self._enter(opt)
        self._in_step = id(opt)
        if closure:  # LBFGS & co: gradients exist only once the closure's backward has run
            self._closure_pending = id(opt)
            self._closure_loss_taken = False
        else:
            grad_scale = getattr(opt, "grad_scale", None)
            measured = self.rec.record_grads(slots, grad_scale=grad_scale)
            found_inf = getattr(opt, "found_inf", None)  # fused optimizer under GradScaler
            if isinstance(found_inf, torch.Tensor):
                self.rec.note_skipped(found_inf)
            # remedies act here, after the statistics were taken: clipping, or skipping a
            # non-finite step (then there is no update to measure)
            if self.rec.before_update(opt, measured, grad_scale):
                return
        if self.sampled_updates():
            self.rec.snapshot_weights(slots)

    def optimizer_post(self, opt: torch.optim.Optimizer) -> None:
        slots = self._counted(opt)
        if not slots or not self.row_open:
            return
        if self._closure_pending == id(opt):  # the closure never called backward
            self.rec.record_grads(slots)
            self._closure_pending = None
        self._in_step = None
        self.rec.after_update(opt)
        self.rec.update_weights()
        self._end_if_complete()

    def scaler_skipped(self, opt: torch.optim.Optimizer) -> None:
        """GradScaler found inf/NaN and skipped ``opt.step()``: no optimizer hook fired."""
        slots = self._counted(opt)
        if not slots:
            return
        self._enter(opt)
        # GradScaler unscaled the gradients before deciding; they are what it found non-finite
        self.rec.record_grads(slots, known_nonfinite=True)
        self.rec.note_skipped(1.0)
        self.rec.cancel_weights()
        self._end_if_complete()

    def scaler_step(self, opt: torch.optim.Optimizer, scale: torch.Tensor | None) -> None:
        if scale is not None and self.slots_for(opt):
            self._ensure_row()
            self.rec.note_scale(scale)

    # -- backward moments ---------------------------------------------------------------------
    def before_backward(self) -> None:
        # Gradient resets are only visible before the backward pass refills the gradients.
        self._update_seen = (
            self._in_step is None
            and self.mode == AUTO
            and self._backwards > 0
            and self._updated_since_backward()
        )

    def after_backward(self, loss: torch.Tensor | None) -> None:
        self.moments += 1
        if self._in_step is None:
            if self.mode == BACKWARD and self._backwards:
                self.commit(end_window=False)  # the previous backward pass was a whole step
            elif self._update_seen:
                self.mode = BACKWARD  # weights changed with no optimizer: a hand-written loop
                self.commit(end_window=False)
            self._update_seen = False
        if self._in_step is not None:  # inside a closure: only the first evaluation counts
            if self._closure_pending == self._in_step:
                ref, _, slots = self._slots[self._in_step]
                measured = self.rec.record_grads(slots, at_backward=True)
                self._closure_pending = None
                opt = ref()
                # the remedies act on these gradients, before the optimizer uses them (a
                # framework's own clipping, run after the closure, comes after ours)
                if opt is not None and self.rec.before_update(opt, measured, None):
                    self.rec.cancel_weights()  # skipped: no update to measure
            if loss is not None and not self._closure_loss_taken:
                self.rec.note_loss(loss)
                self._closure_loss_taken = True
            return
        self._ensure_row()
        if loss is not None:
            self.rec.note_loss(loss)
        if self._grads_at_backward():
            slots = self.table.params
            self.rec.record_grads(slots, at_backward=True)
            if self.sampled_updates() and not self._backwards:
                self.rec.snapshot_weights(slots)
            if self.mode == AUTO:
                self._remember_for_evidence()
        self._backwards += 1
        self.rec.end_window()
        if self.mode == BACKWARD:
            self.rec.set_sampling(self.sampled(self.step + 1))  # the next forward is a new step

    def finish(self) -> None:
        """The run ends. A step still open is complete where steps close lazily (backward and
        manual modes, or auto before any optimizer); in optimizer mode it never reached its
        optimizer step, so it is dropped."""
        if not self.row_open:
            return
        if self.mode == OPTIMIZER:
            self.rec.discard_row()
            self.row_open = False
        else:
            self.commit()

    def abandon(self) -> None:
        """The program's code raised in the middle of a step and went on (a notebook cell
        interrupted, then the next cell trains). Inside ``optimizer.step()`` (its post-hook
        will never come): the step happened, its gradients were measured, so it ends here.
        Before any optimizer stepped in it (in the forward or backward pass, or the user's code
        between them): the iteration never reached an optimizer, so, as at the end of a run,
        it is not a step and what it recorded is dropped (the next backward pass would
        otherwise add its loss to it)."""
        in_step, self._in_step, self._closure_pending = self._in_step, None, None
        if not self.row_open:
            return
        if in_step is not None:
            self.commit()
            self._ended_by_optimizer = True
        elif self.mode == OPTIMIZER and not self._stepped:
            self.rec.discard_row()
            self.row_open = False
            self._backwards = 0

    def manual_step(self) -> None:
        self.mode = MANUAL
        self._ensure_row()
        self.commit()

    # -- auto-mode evidence -------------------------------------------------------------------
    def _remember_for_evidence(self) -> None:
        with_grad = [s for s in self.table.params if s.param.grad is not None]
        if not with_grad:
            self._evidence = None
            return
        slot = min(with_grad, key=lambda s: s.param.numel())
        p = slot.param
        assert p.grad is not None
        self._evidence = (slot, p._version, id(p.grad), p.detach().clone())

    def _updated_since_backward(self) -> bool:
        """Did the weights change since the last backward pass, with no optimizer step?"""
        if self._evidence is None:
            return False
        slot, version, grad_id, copy = self._evidence
        p = slot.param
        if p._version != version or p.grad is None or id(p.grad) != grad_id:
            return True
        # `.data` updates move no version counter: compare values (one small tensor; this
        # check runs only until the first optimizer step or the first detected update)
        return not torch.equal(p.detach(), copy)
