"""The parts a :class:`~gradscope.scope.Scope` is made of, and how the remedies are wired in.

:class:`Parts` is what ``Scope.parts`` returns: a documented test hook for tests and debugging,
not a stable API. :func:`make_remedies` builds the remedies a configuration asks for and hands
each to the part that runs it: the step-time ones (clip, guard) to the recorder, which calls
them at the optimizer step; the finding-time ones (swap, recycle) to the flusher, which calls
them after the rules and attaches what they did to the findings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .clock import Clock
from .events import Event
from .failures import warn
from .flusher import Flusher
from .hooks import HookSet
from .listener import OptimizerHooks
from .naming import first_device, holds_compiled
from .probes.nonfinite import NonfiniteTracer
from .probes.replay import StepReplay
from .recorder import StepRecorder
from .remedies import describe

if TYPE_CHECKING:
    from .config import Config
    from .guard import Guard
    from .layers import LayerTable
    from .outputs import Outputs
    from .ranks import RankCoordinator
    from .remedies.steps import StepRemedies
    from .remedies.units import UnitRemedies
    from .rules.advice import Launcher
    from .sinks.console import FindingPrinter


class Remedies(NamedTuple):
    """The remedies of one Scope (None where off)."""

    steps: StepRemedies | None  # clip, guard: at the optimizer step (the recorder's)
    units: UnitRemedies | None  # swap, recycle: on findings (the flusher's)

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps: the step-time remedies' state (None when off)."""
        return self.steps.state_dict() if self.steps is not None else None

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; the clip option must be the one it was saved with."""
        if self.steps is None:
            if saved is None or saved.get("clip") is None:
                return  # nothing to restore: no clipper, and no guard to count for
            raise ValueError(
                f"load_state_dict: the state was saved with clip={saved['clip']!r}"
                ", this scope has no remedy"
            )
        self.steps.load_state_dict(saved if saved is not None else {"clip": None, "clippers": []})


class Parts(NamedTuple):
    """What :attr:`Scope.parts <gradscope.scope.Scope.parts>` returns."""

    clock: Clock
    recorder: StepRecorder
    flusher: Flusher
    outputs: Outputs
    tracer: NonfiniteTracer
    hooks: HookSet
    remedies: Remedies
    guard: Guard
    optimizer_hooks: OptimizerHooks


def build_parts(
    config: Config,
    table: LayerTable,
    models: dict[str, nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    guard: Guard,
    outputs: Outputs,
    ranks: RankCoordinator | None,
    on_cpu: bool,
    *,
    console: FindingPrinter,
    after_write: Callable[[], None],
    stack: contextlib.ExitStack[Any],
    launcher: Launcher = "watch",
    callers: Mapping[int, nn.Module] | None = None,
) -> Parts:
    """Build the measuring parts of a Scope and wire them to each other: the recorder and
    its clock, the flusher (with the rules), the NaN/Inf tracer, the hooks on the model and
    the optimizers, the remedies. What must come off at ``close()`` goes on ``stack``.

    Args:
        config, table, models, optimizers, guard, outputs, ranks: The Scope's.
        on_cpu: The model is on the CPU now (flags are read on the host for free).
        console: Prints findings as they are raised.
        after_write: Called after each written flush (run.json's cadence).
        stack: The Scope's ExitStack.
        launcher: How the run was started (``"run"``: ``gradscope run``; advice spells
            options as command-line flags).
        callers: The compiled wrappers the user calls, by the id of the module each runs.
    """
    rec = StepRecorder(
        table,
        config,
        guard,
        on_cpu,
        outputs.event,
        outputs.record,
        warn,
        whole_masks=ranks is not None,
        histograms=outputs.histograms,
    )
    clock = rec.clock = Clock(
        table,
        rec,
        config.step_on,
        config.activation_every,
        config.resolved_update_every,
        optimizers,
    )
    flusher = rec.flusher = Flusher(
        rec,
        outputs,
        console,
        ranks,
        guard,
        on_cpu=lambda: first_device(models).type == "cpu",
        after_write=after_write,
        warn=warn,
        launcher=launcher,
    )
    if ranks is not None:
        diagnoser = flusher.diagnoser
        ranks.record = outputs.record
        ranks.merge = diagnoser.merge if diagnoser is not None else (lambda episode: None)
        ranks.step = lambda: clock.step
    hooks = HookSet()
    stack.callback(hooks.close)
    tracer = rec.tracer = NonfiniteTracer(
        models,
        config.trace_nonfinite,
        immediate=on_cpu,
        report=flusher.traced,
        step=lambda: clock.step,
        guard=guard,
    )
    stack.callback(tracer.close)
    if config.trace_nonfinite == "auto":
        rec.replay = StepReplay(models, tracer, rec.modules, guard, callers)
        stack.callback(rec.replay.close)
    rec.grads.on_nonfinite = rec.flag_nonfinite
    if callers or any(holds_compiled(m) for m in models.values()):
        rec.modules.stop_parking("a compiled model: dynamo guards on the hook dicts")
    rec.modules.attach(hooks, models.values())
    if config.functional_activations:
        from .probes.functional import attach_functional

        functional = attach_functional(rec.modules, table, config, guard, hooks, models.values())
        stack.callback(functional.close)
    remedies = make_remedies(config, table, models, rec, flusher, outputs, tracer, ranks, warn)
    optimizer_hooks = OptimizerHooks(clock, guard)
    optimizer_hooks.attach(hooks, optimizers)
    return Parts(clock, rec, flusher, outputs, tracer, hooks, remedies, guard, optimizer_hooks)


def make_remedies(
    config: Config,
    table: LayerTable,
    models: dict[str, nn.Module],
    recorder: StepRecorder,
    flusher: Flusher,
    outputs: Outputs,
    tracer: NonfiniteTracer,
    ranks: RankCoordinator | None,
    warn: Callable[[str], None] = warn,
) -> Remedies:
    """The remedies ``config`` asks for, wired into ``recorder`` and ``flusher``; the
    ``remedies`` event says which, and a swap that can never act says why (an event, a
    warning)."""
    steps = units = None
    if config.clip or config.guard:
        from .remedies.steps import StepRemedies

        sharded = ranks is not None and ranks.sharded
        steps = recorder.remedies = StepRemedies(
            config.clip,
            config.guard,
            table,
            outputs.event,
            combine=ranks.combine_norms if sharded and ranks is not None else None,
        )
    if config.swap or config.recycle:
        from .remedies.units import UnitRemedies

        units = flusher.remedies = UnitRemedies(
            config.swap,
            config.recycle,
            table,
            recorder.modules,
            models,
            outputs.event,
            config.thresholds.patience * config.activation_every,
            on_replace=tracer.replace_module,
        )
        recorder.sample_findings = True
    if steps is not None or units is not None:
        outputs.record(
            Event.remedies(describe(config.clip, config.guard, config.swap, config.recycle))
        )
    for note in units.check_model() if units is not None else ():
        outputs.record(Event.remedy_inactive(note))
        warn(f"gradscope: {note}")
    return Remedies(steps, units)
