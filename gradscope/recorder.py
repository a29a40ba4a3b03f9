"""The step recorder: what the clock's moments write into the step buffer.

The :class:`~gradscope.clock.Clock` decides where steps begin and end; this class does the
recording it asks for (the clock's ``Recorder`` protocol): opening and closing rows, reading the
gradients through the gradient probe, snapshotting weights for update ratios, the run-level
columns (loss, GradScaler's scale and skips, clipping), the remedies that act at the optimizer
step (clipping, skipping a non-finite step), and flushing when a flush is due. It owns the step
buffer and the three probes; nothing here reads a tensor on the host except where the probes'
docstrings say so (the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import patches
from .buffer import StepBuffer
from .config import FLUSH_STEPS
from .events import Event
from .guard import ACTIVATIONS, TRACER, Guard
from .layers import LayerTable, ParamSlot
from .probes.activations import ModuleProbe
from .probes.grads import GradProbe
from .probes.weights import WeightProbe
from .records import RUN_LAYER

if TYPE_CHECKING:
    from .clock import Clock
    from .config import Config
    from .flusher import Flusher
    from .probes.nonfinite import NonfiniteTracer
    from .probes.replay import StepReplay
    from .remedies.steps import StepRemedies

RUN_COLUMNS = (
    "loss",
    "skipped_step",
    "amp_scale",
    "guard_skipped",
    "grad_norm_total_clipped",
    "clip_coef",
    "clip_threshold",
    "lr",
)
"""Run-level columns the recorder writes itself (``grad_norm_total`` is derived at flush)."""

Emit = Callable[[Event], None]
Warn = Callable[[str], None]


def group_lr(value: Any) -> float | None:
    """One param group's ``lr`` as a float: a number as it is, a tensor on the CPU through
    ``.item()`` (free there); a tensor on an accelerator is skipped (reading it would wait for
    the device)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            return None
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def optimizer_lr(opt: torch.optim.Optimizer, key: str = "lr") -> float | None:
    """The largest ``key`` (``lr``, or ``initial_lr`` a scheduler set) over ``opt``'s param
    groups; None where none is readable."""
    values = [group_lr(g.get(key)) for g in getattr(opt, "param_groups", ())]
    known = [v for v in values if v is not None]
    return max(known) if known else None


class StepRecorder:
    """Implements :class:`gradscope.clock.Recorder` for one Scope.

    Args:
        table: The watched layers.
        config: The run's configuration.
        guard: The Scope's guard (an activation error switches sampling off for good).
        on_cpu: Tensors live on the CPU: host reads of flags are free.
        event: Writes one event (events.jsonl, TensorBoard text).
        record: Writes one event to events.jsonl only.
        warn: Tells the user once (a warning, or one line where warnings are errors).
        whole_masks: Several ranks: dead-unit masks go to the flush, to be combined.
        histograms: Gradient histograms on sampled steps (TensorBoard).

    Attributes wired by the Scope after construction: ``clock``, ``flusher``, ``tracer``,
    ``remedies`` (the step-time remedies: None when neither clip nor guard is on), and
    ``sample_findings`` (the finding-time remedies are on: diagnose at every sampled step).
    """

    def __init__(
        self,
        table: LayerTable,
        config: Config,
        guard: Guard,
        on_cpu: bool,
        event: Emit,
        record: Emit,
        warn: Warn,
        whole_masks: bool = False,
        histograms: bool = False,
    ) -> None:
        self.table = table
        self.config = config
        self._guard = guard
        self._event = event
        self._record = record
        self._warn = warn
        self.on_cpu = on_cpu
        self.buffer = StepBuffer(config.flush_every or FLUSH_STEPS)
        self.grads = GradProbe(
            self.buffer, "host" if on_cpu else "flagged-only", histograms=histograms
        )
        self.weights = WeightProbe(self.buffer, config.update_ratio, count_on_host=on_cpu)
        self.modules = ModuleProbe(self.buffer, table, config, count_on_host=on_cpu, guard=guard)
        self.modules.whole_masks = whole_masks
        self.cols = {name: self.buffer.group(((RUN_LAYER, "run", name),)) for name in RUN_COLUMNS}
        self.clock: Clock
        self.flusher: Flusher
        self.tracer: NonfiniteTracer
        self.replay: StepReplay | None = None  # replay on detection (CPU, trace_nonfinite=auto)
        self._loss_flagged = False  # a non-finite loss this step, left to the replay
        self.remedies: StepRemedies | None = None
        self.sample_findings = False
        self._loss: torch.Tensor | None = None  # sum of the step's losses
        self._loss_count = 0
        self._lr: float | None = None  # the step's learning rate (max over its optimizers)
        self.clip_from: int | None = None  # the first step clip= acted on
        self._scaler_seen = False
        self._skip_noted = False
        self._user_clipped: set[int] = set()  # slots the script clipped in this step
        self._user_clip_noted = False
        self._remedy_warned = False
        self._hooks_verified = not table.modules

    # -- rows --------------------------------------------------------------------------------
    def open_row(self, step: int) -> None:
        if self.flusher.due():
            self.flusher.flush()
        self.buffer.open_row(step)

    def reopen_row(self, step: int, drop_current: bool) -> bool:
        return self.buffer.reopen(step, drop_current)

    def discard_row(self) -> None:
        self.buffer.discard_current()
        self._user_clipped.clear()
        self._loss, self._loss_count = None, 0
        self._lr = None
        self._skip_noted = False
        self.weights.cancel()
        self.modules.discard()
        if self.replay is not None:
            self.replay.clear()
        self._loss_flagged = False

    def commit_row(self) -> None:
        step = self.clock.step
        if not self._hooks_verified:
            self._check_hooks_run(step)
        self.modules.new_step()
        self._user_clipped.clear()
        if self._loss is not None:
            loss = self._loss if self._loss_count == 1 else self._loss / self._loss_count
            self.buffer.write(self.cols["loss"], loss)
            self._loss, self._loss_count = None, 0
        if self._lr is not None:
            self.buffer.write_host(self.cols["lr"].cols[0], self._lr)
            self._lr = None
        if self._scaler_seen and not self._skip_noted:
            self.buffer.write_host(self.cols["skipped_step"].cols[0], 0.0)
        self._skip_noted = False
        self.modules.finalize()
        if self.replay is not None:
            self.replay.clear()
        if self._loss_flagged:
            self._loss_flagged = False
            self.tracer.flag(step)  # a no-op once the culprit is named
        if self.tracer.armed:
            self.tracer.end_step()
        rem = self.remedies
        if self.flusher.due() or self.flusher.overdue():
            self.flusher.flush()
        elif self.sample_findings and self.clock.sampled(step):
            self.flusher.flush(write=False)  # swap/recycle act on findings: every sample
        if (
            rem is not None
            and not self._remedy_warned
            and self.clock.mode in ("backward", "manual")
        ):
            self._remedy_warned = True
            note = (
                "clip= and guard= act at optimizer.step(); this loop updates the weights "
                "without an optimizer, so they are not applied"
            )
            self._event(Event.remedy_inactive(note, step))
            self._warn(f"gradscope: {note}")

    def _check_hooks_run(self, step: int) -> None:
        """Steps end but no forward hook of ours has ever run: the forward passes bypass the
        watched modules' hooks. The usual cause is torch.compile: a compiled model called
        before ``watch()`` keeps its graph, and dynamo ignores hooks added after its first
        call. Say so once, instead of silently recording no activation statistics."""
        if self.modules.forward_ever:
            self._hooks_verified = True
            return
        if step < 2:
            return
        self._hooks_verified = True
        note = (
            f"no forward hook has run in {step + 1} steps: the model's forward passes do "
            "not go through the watched modules' hooks. Most likely the model was compiled "
            "and called before watch() (torch.compile ignores hooks added after its first "
            "call). Activation statistics, the backward signal and the NaN tracer are off "
            "for this run; gradient statistics are not affected. Call watch() before the "
            "first call of the compiled model, or torch._dynamo.reset() after watch()."
        )
        self._event(Event.hooks_inactive(step, note))
        self._warn(f"gradscope: {note}")

    # -- gradients and updates ----------------------------------------------------------------
    def record_grads(
        self,
        slots: Sequence[ParamSlot],
        grad_scale: Any = None,
        known_nonfinite: bool = False,
        at_backward: bool = False,
    ) -> Any:
        # read at the end of a backward pass that started from GradScaler.scale(): the
        # gradients still carry the loss scale
        scaled = at_backward and patches.backward_was_scaled()
        clipped = self._user_clipped
        sampled = self.clock.sampled_updates()
        if not clipped or at_backward or known_nonfinite:
            return self.grads.record(slots, sampled, grad_scale, known_nonfinite, scaled)
        # the script clipped some of these itself: their statistics were taken before its
        # clip; what reaches the optimizer is recorded as grad_norm_clipped
        before = [s for s in slots if s.index not in clipped]
        after = [s for s in slots if s.index in clipped]
        parts = [
            m
            for m in (
                self.grads.record(before, sampled, grad_scale) if before else None,
                self.grads.record_clipped(after, grad_scale),
            )
            if m is not None
        ]
        if len(parts) < 2:
            return parts[0] if parts else None
        (s1, g1, n1), (s2, g2, n2) = parts
        return s1 + s2, g1 + g2, torch.cat([n1, n2.to(n1.device)])

    def before_update(self, opt: torch.optim.Optimizer, measured: Any, grad_scale: Any) -> bool:
        """Right before ``opt`` updates the weights, after the statistics: the guard and
        clipping. True when the step is skipped. Also notes the learning rate the step uses."""
        self.note_lr(opt)
        rem = self.remedies
        if rem is None:
            return False
        skip, result = rem.before_step(
            opt, measured, grad_scale, patches.in_scaler_step(opt), self.clock.step
        )
        if skip:
            self.note_skipped(1.0)
            self.buffer.write_host(self.cols["guard_skipped"].cols[0], 1.0)
            return True
        if result is not None and self.clip_from is None:
            self.clip_from = self.clock.step
        if result is not None and measured is not None:
            slots = result.slots  # the watched ones, in the order the clipper saw them
            groups = self.grads.param_groups
            self.buffer.write(groups(slots, "grad_norm_clipped"), result.post)
            self.buffer.write(self.cols["grad_norm_total_clipped"], result.total_post)
            ratio = torch.where(
                result.total_pre > 0,
                result.total_post / result.total_pre.clamp_min(1e-30),
                torch.ones_like(result.total_pre),
            )
            self.buffer.write(self.cols["clip_coef"], ratio)
            assert rem.clip is not None
            if rem.clip.per_layer or rem.clip.method == "agc":
                self.buffer.write(groups(slots, "clip_coef"), result.coef)
                if result.threshold is not None:
                    self.buffer.write(groups(slots, "clip_threshold"), result.threshold)
            elif result.threshold is not None:
                self.buffer.write(self.cols["clip_threshold"], result.threshold)
        return False

    def after_update(self, opt: torch.optim.Optimizer) -> None:
        if self.remedies is not None:
            self.remedies.after_step(opt)

    def snapshot_weights(self, slots: Sequence[ParamSlot]) -> None:
        self.weights.snapshot(slots)

    def update_weights(self) -> None:
        self.weights.update()

    def cancel_weights(self) -> None:
        self.weights.cancel()

    # -- activations and run-level values -----------------------------------------------------
    def end_window(self) -> None:
        self.modules.end_window()

    def set_sampling(self, sampled: bool) -> None:
        self.modules.sampling = sampled and self._guard.active(ACTIVATIONS)

    def note_loss(self, loss: torch.Tensor) -> None:
        # a running sum, not a list: a loop that never steps must not grow without bound
        loss = loss.reshape(())  # detached by the backward patch
        tracer = self.tracer
        if (
            self.on_cpu
            and tracer.mode != "off"
            and not tracer.done
            and loss.is_floating_point()
            and not math.isfinite(loss.item())  # (a 0-d CPU tensor: 25x cheaper than isfinite)
        ):
            # free on the CPU: no device to wait for. The backward pass is over and the weights
            # are still those of this step's forward: replay it now (arming would see none of
            # this step); if the replay names none, the step's end arms the tracer.
            if self.replay is not None and self.replay.calls and not tracer.armed:
                self._loss_flagged = True
                self._guard.isolate(TRACER, "tracer-flag", self.replay.replay, loss)
            else:
                tracer.flag(self.clock.step)
        self._loss = loss if self._loss is None else self._loss + loss.to(self._loss.dtype)
        self._loss_count += 1

    def note_lr(self, opt: torch.optim.Optimizer) -> None:
        """The learning rate ``opt`` steps with (the largest of its param groups'), read as a
        Python number: no device sync, nothing the training sees changes."""
        lr = optimizer_lr(opt)
        if lr is not None:
            self._lr = lr if self._lr is None else max(self._lr, lr)

    def note_skipped(self, value: torch.Tensor | float) -> None:
        self._skip_noted = True
        if isinstance(value, torch.Tensor):
            self.buffer.write(self.cols["skipped_step"], value.float())
        else:
            self.buffer.write_host(self.cols["skipped_step"].cols[0], float(value))

    def note_scale(self, scale: torch.Tensor) -> None:
        self._scaler_seen = True
        # GradScaler.update() changes its scale tensor in place: keep this step's value
        self.buffer.write(self.cols["amp_scale"], scale.detach().clone())

    def flag_nonfinite(self) -> None:
        """The gradient probe saw a non-finite gradient. Before the optimizer step, with the
        tracer not armed for this step: replay the step's forward calls with it armed, to
        name the culprit now; otherwise (or if the replay named none), arm it for the next
        steps. Errors cost the tracer only."""
        self._guard.isolate(TRACER, "tracer-flag", self._on_flag)

    def _on_flag(self) -> None:
        tracer, replay = self.tracer, self.replay
        if replay is not None and replay.calls and not tracer.armed:
            replay.replay()  # the weights are still those of this step's forward
        tracer.flag(self.clock.step)

    # -- the script's own clipping and GradScaler's skipped steps -----------------------------
    def user_clip(self, params: list[torch.Tensor], function: str, detail: dict[str, Any]) -> None:
        """The script clips its own gradients (``clip_grad_norm_`` and co. between
        ``backward()`` and ``step()``): take the gradient statistics now, as its clip sees
        them, so ``grad_norm`` shows an explosion the clip would hide; the norms after its
        clip are read at the optimizer step as ``grad_norm_clipped``."""
        clock = self.clock
        if not clock.row_open or clock.in_optimizer_step:
            return  # not between a backward pass of ours and an optimizer step
        slots = [s for s in self.table.slots_of(params) if s.index not in self._user_clipped]
        if not slots:
            return
        self.grads.record(slots, clock.sampled_updates())
        self._user_clipped.update(s.index for s in slots)
        if not self._user_clip_noted:
            self._user_clip_noted = True
            self._event(Event.script_clip(clock.step, function, **detail))

    def closure_clipped(self, params: list[torch.Tensor]) -> None:
        """The script (a framework: Lightning's automatic optimization) clipped inside
        ``optimizer.step(closure)``: the statistics were taken after the closure's backward,
        before this clip; the norms after it are ``grad_norm_clipped``."""
        if not (self.clock.in_optimizer_step and self.clock.row_open):
            return
        slots = self.table.slots_of(params)
        if slots:
            self.grads.record_clipped(slots)

    def scaler_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        """GradScaler found inf/NaN and skipped ``optimizer.step()``."""
        if not self.clock.slots_for(optimizer):
            return
        step = self.clock.step
        self.clock.scaler_skipped(optimizer)
        self._record(
            Event.skipped_step(
                step,
                "GradScaler",
                "inf/NaN in the scaled gradients; optimizer.step() was not called",
            )
        )

    # -- the model moved -----------------------------------------------------------------------
    def follow_device(self, on_cpu: bool) -> None:
        """The model moved (``.to("cuda")`` after a first forward on the CPU, which is where
        ``gradscope run`` may have found it): host reads are free on the CPU only."""
        if on_cpu == self.on_cpu:
            return
        self.on_cpu = on_cpu
        self.grads.count_policy = "host" if on_cpu else "flagged-only"
        self.modules.count_on_host = on_cpu
        self.tracer.immediate = on_cpu

    def release(self) -> None:
        self.modules.release()
        self.weights.release()
        self.buffer.release()
        self._loss = None
