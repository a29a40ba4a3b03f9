"""The flush: buffered steps → one host transfer → a record table → the rules → every sink.

Every ``flush_every`` steps (or ``flush_secs`` seconds, in a single process; by default every 100
steps but at most once in 5 seconds, see :meth:`Flusher.due`) the step buffer's
rows are copied to the host in one transfer, their derived metrics completed (``grad_norm_total``
and the exact non-finite counts, update ratios, activation means, stds and fractions), combined
with the other ranks' where there are several, diagnosed, and written.

No record is lost on the way: rows stay in the buffer until their table is pending, and a
pending table stays until every sink has written it, so a signal (or a failure) in the middle of
a flush costs nothing: the next flush, or the one at ``close()``, writes what this one did not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import FLUSH_MAX_SECS, FLUSH_MAX_STEPS, FLUSH_MIN_SECS, FLUSH_SHARE, FLUSH_STEPS
from .events import Event, Finding
from .guard import REMEDIES, Guard
from .imports import own_imports
from .interrupts import held
from .outputs import Outputs
from .probes.activations import ModuleProbe
from .probes.weights import WeightProbe
from .recorder import optimizer_lr
from .records import RUN_LAYER, LongTable
from .rules.advice import NORM_TYPES, Launcher, OptimizerInfo, RunContext
from .rules.engine import FINDING_REMEDY_RULES, Diagnoser, layer_info
from .rules.nonfinite import traced_episode

if TYPE_CHECKING:
    from .ranks import RankCoordinator
    from .recorder import StepRecorder
    from .remedies.units import UnitRemedies
    from .sinks.console import FindingPrinter


class Flusher:
    """Moves the recorder's buffered steps to the rules and the sinks.

    Args:
        recorder: Owns the step buffer and the probes.
        outputs: The sinks.
        console: Prints each finding as it is raised, and the summary at the end.
        ranks: Several processes: the flush exchange (None in a single process).
        guard: The Scope's guard.
        on_device: Returns whether the watched model is on the CPU now (it may move).
        after_write: Called after every written flush (run.json's cadence).
        warn: Tells the user once.
        launcher: How the run was started (``"watch"``, or ``"run"``: ``gradscope run``):
            advice spells gradscope's options as ``watch()`` keywords or command-line flags.

    The rules (:class:`~gradscope.rules.engine.Diagnoser`, None with ``diagnose=False``) are
    the flusher's: it feeds them every flushed table and announces what they raise.
    """

    def __init__(
        self,
        recorder: StepRecorder,
        outputs: Outputs,
        console: FindingPrinter,
        ranks: RankCoordinator | None,
        guard: Guard,
        on_cpu: Callable[[], bool],
        after_write: Callable[[], None],
        warn: Callable[[str], None],
        launcher: Launcher = "watch",
    ) -> None:
        self._rec = recorder
        self._out = outputs
        self.console = console
        self.launcher: Launcher = launcher
        self._first_lr: dict[int, float] = {}  # id(optimizer) -> the first lr seen
        config = recorder.config
        self.diagnoser = (
            Diagnoser(
                config.thresholds,
                self.announce,
                sample_every=max(config.activation_every, config.resolved_update_every),
            )
            if config.diagnose
            else None
        )
        if self.diagnoser is not None:  # what is known before the first flush
            self.diagnoser.context = RunContext(launcher=launcher)
        self._ranks = ranks
        self._guard = guard
        self._on_cpu = on_cpu
        self._after_write = after_write
        self._warn = warn
        self.last = time.monotonic()
        self.cost = 0.0  # CPU seconds of the last written flush (the first one's not counted)
        self.flushes = 0
        # flushed from the buffer, not yet written by every sink: (table, sinks done, rows)
        self._pending: list[tuple[LongTable, set[int], int]] = []
        self._pending_rows = 0
        self.remedies: UnitRemedies | None = None  # wired by the Scope: swap, recycle
        # wired by the Scope in a notebook: the live view, after each written flush, with the
        # records it took (None: none new)
        self.on_flush: Callable[[LongTable | None], None] | None = None

    def due(self) -> bool:
        """The buffer (with what waits for a sink) holds ``flush_every`` steps; by default
        (None) ``FLUSH_STEPS`` steps (the first flush: at once) and :meth:`gap` seconds since
        the last flush, or
        ``FLUSH_MAX_STEPS`` steps (several processes: ``FLUSH_STEPS``, the flush is a
        collective at the same step on every rank)."""
        held = len(self._rec.buffer.rows) + self._pending_rows
        every = self._rec.config.flush_every
        if every is not None:
            return held >= every
        if held < FLUSH_STEPS:
            return False
        return (
            self._ranks is not None
            or not self.flushes  # the first: early findings, run.json's layers, one-time imports
            or held >= FLUSH_MAX_STEPS
            or time.monotonic() - self.last >= self.gap()
        )

    def gap(self) -> float:
        """The default's least time between two flushes: ``FLUSH_MIN_SECS``, or longer where
        the last flush took more than ``FLUSH_SHARE`` of that (a model of thousands of layers:
        the rules' and sinks' work grows with the layers, not with the step's cost), at most
        ``FLUSH_MAX_SECS``."""
        return min(max(FLUSH_MIN_SECS, self.cost / FLUSH_SHARE), FLUSH_MAX_SECS)

    def overdue(self) -> bool:
        """``flush_secs`` passed since the last flush (by default also :meth:`gap`; a single
        process only: with several ranks the flushes are collectives, so they go by steps)."""
        if self._ranks is not None:
            return False
        since = time.monotonic() - self.last
        if self._rec.config.flush_every is None and since < self.gap():
            return False
        return since >= self._rec.config.flush_secs

    def flush(self, write: bool = True) -> None:
        """Copy the buffered steps to the host and diagnose them; ``write``: also write them
        (and everything diagnosed early) to the sinks. Early diagnosis (``write=False``)
        serves the remedies that act on findings, without a Parquet file per sample."""
        start = time.process_time()
        # the first flush imports pyarrow: never the script's modules; a Ctrl-C waits for the
        # flush to end (interrupts.held)
        with own_imports(), held():
            self._flush(write)
            if write and self.flushes:  # (not the first: its one-time imports are no cadence)
                self.cost = time.process_time() - start
            self.flushes += write

    def _flush(self, write: bool) -> None:
        rec = self._rec
        if write:
            self.last = time.monotonic()
            rec.follow_device(self._on_cpu())
        # a step in progress (a flush() called mid-step) stays on the device
        taken = rec.buffer.take(keep_current=rec.clock.row_open)
        chunk = taken
        table: LongTable | None = None
        if self._ranks is not None and self._ranks.active:
            chunk = self._ranks.exchange(chunk, self._warn)
        if chunk is not None:
            rec.grads.complete(chunk)
            WeightProbe.complete(chunk)
            ModuleProbe.complete(chunk)
            table = LongTable.from_chunk(chunk)
            self._pending.append(
                (table if rec.grads.histograms else table.published(), set(), len(chunk.steps))
            )
            if taken is not None:
                rec.buffer.forget(taken)
            self._pending_rows += len(chunk.steps)
            if self.diagnoser is not None:
                self._diagnose(table, early=not write)
        elif taken is not None:
            rec.buffer.forget(taken)
        if not write:
            return
        if self._pending:
            self._write_pending()
        self._after_write()
        if self.on_flush is not None:
            self.on_flush(table)

    def _write_pending(self) -> None:
        """Every pending table to every sink that has not written it yet; a table leaves the
        queue once all have (a sink switched off counts as done: it writes no more)."""
        out = self._out
        histograms = self._rec.grads.histograms
        stored: list[LongTable] = []
        for sink in out.sinks:
            key = id(sink)
            todo = [t for t, done, _ in self._pending if key not in done]
            if not todo:
                continue
            raw = LongTable.concat(todo)
            # only TensorBoard reads the raw histogram columns
            table = raw if sink is out.tensorboard or not histograms else raw.published()
            if out.write(sink, table):
                for _, done, _ in self._pending:
                    done.add(key)
                if sink is out.store:
                    stored.append(table)
        live = {id(s) for s in out.sinks if out.live(s)}
        self._pending = [p for p in self._pending if not live <= p[1]]
        self._pending_rows = sum(p[2] for p in self._pending)
        for table in stored:
            self._summarize_clipping(table)

    def _diagnose(self, table: LongTable, early: bool = False) -> None:
        """Run the rules on newly flushed records. ``early`` (a sample between flushes, for the
        remedies that act on findings): only the rules those remedies read."""
        diagnoser = self.diagnoser
        assert diagnoser is not None
        rec = self._rec
        describe = rec.table.describe()
        info = layer_info(describe, rec.modules.site_names())
        context = self.context(describe)
        diagnoser.update(table, info, FINDING_REMEDY_RULES if early else None, context)
        for error in diagnoser.errors:
            self._out.record(Event.internal_error("rules", error))
        diagnoser.errors.clear()
        rem = self.remedies
        if rem is not None:
            # a remedy bug must not take training down: the remedies switch off
            actions = self._guard.isolate(
                REMEDIES,
                "remedies",
                rem.on_findings,
                diagnoser.findings,
                rec.clock.step,
                rec.clock.optimizers(),
            )
            for action in actions or ():
                diagnoser.attach(action.finding, action.record)
                self.console.remedy(action.finding, action.record)

    def context(self, describe: list[dict[str, Any]] | None = None) -> RunContext:
        """What the rules know about the run now besides its records (``describe``: the
        layer table's, when already at hand): how it was started, the optimizers and their
        learning rates (Python numbers in ``param_groups``: no device read), the normalisation
        and activation modules, the remedies in force and what they did."""
        rec = self._rec
        describe = rec.table.describe() if describe is None else describe
        optimizers = []
        for opt in rec.clock.optimizers():
            lr = optimizer_lr(opt)
            if lr is not None:
                self._first_lr.setdefault(id(opt), lr)
            initial = optimizer_lr(opt, "initial_lr")
            if initial is None:
                initial = self._first_lr.get(id(opt))
            optimizers.append(OptimizerInfo(type(opt).__name__, lr, initial))
        types = [e["type"] for e in describe if e.get("kind") == "module"]
        norms = tuple(dict.fromkeys(t for t in types if t in NORM_TYPES))
        activations = tuple(
            dict.fromkeys(
                e["type"] for e in describe if e.get("kind") == "module" and e.get("family")
            )
        )
        config = rec.config
        steps = rec.remedies
        clip = steps.clip if steps is not None else None
        bound = None
        if clip is not None and clip.method == "norm" and not clip.per_layer:
            bound = float(clip["max"])
        guard = steps.guard if steps is not None else None
        units = self.remedies
        return RunContext(
            launcher=self.launcher,
            optimizers=tuple(optimizers),
            norms=norms,
            activations=activations,
            clip=str(clip) if clip is not None else None,
            clip_bound=bound,
            clip_from=rec.clip_from,
            guard=guard.max_skips if guard is not None else 0,
            guard_skipped=guard.skips if guard is not None else 0,
            swap=tuple(str(r) for r in config.swap),
            swapped=dict(units.swapped) if units is not None else {},
            recycle=bool(config.recycle),
        )

    def _summarize_clipping(self, table: LongTable) -> None:
        """One ``clipped`` event per flush: how many steps clipping changed, and by how much
        (per-step coefficients are in the records)."""
        import numpy as np

        rem = self._rec.remedies
        if rem is None or rem.clip is None:
            return
        try:
            col = table.columns.index((RUN_LAYER, "run", "clip_coef"))
        except ValueError:
            return
        rows = table.col == col
        if not rows.any():
            return
        coef = table.value[rows]
        steps = table.step[rows]
        clipped = coef < 1.0 - 1e-6
        if clipped.any():
            self._out.event(
                Event.remedy(
                    "clip",
                    "clipped",
                    method=str(rem.clip),
                    steps=[int(steps[0]), int(steps[-1])],
                    clipped_steps=int(clipped.sum()),
                    of_steps=int(rows.sum()),
                    min_coef=float(coef[clipped].min()),
                    median_coef=float(np.median(coef[clipped])),
                )
            )

    def traced(self, info: dict[str, Any]) -> None:
        """The tracer named where the first non-finite value came from: an event, and the
        ``nonfinite`` finding's attribution. With several ranks, every rank hears of it at the
        next flush (the rank is part of the finding)."""
        if self._ranks is not None:
            self._ranks.traced(info)
            return
        self._out.record(Event.nonfinite_traced(info))
        if self.diagnoser is not None:
            self.diagnoser.context = self.context()  # possibly before the first flush
            self.diagnoser.merge(traced_episode(info))

    def announce(self, finding: Finding, new: bool) -> None:
        """A finding raised (``new``) or told again with better information: an event for
        every sink, and a line on stderr."""
        self._out.event(Event.finding(finding, new))
        self.console.announce(finding, new)

    def findings(self, final: bool = False) -> list[Finding]:
        """The findings so far (copies), with which rank went first where there are several;
        ``final``: as findings.json holds them."""
        findings = self.diagnoser.snapshot() if self.diagnoser is not None else []
        if self._ranks is not None:
            findings = self._ranks.evidence(findings)
        return findings
