"""Scope: one watched training run, from ``watch()`` to ``close()``.

The Scope is the facade: the public API, the lifecycle, and the fault guard. It builds the
parts and wires them (see ``docs/design.md``):

* :class:`~gradscope.recorder.StepRecorder`: the step buffer, the probes and the run-level
  columns, driven by the :class:`~gradscope.clock.Clock` (which decides where steps end);
* :class:`~gradscope.flusher.Flusher`: buffer → record table → rules → sinks;
* :class:`~gradscope.outputs.Outputs`: the sinks (the run directory's store, TensorBoard);
* :class:`~gradscope.ranks.RankCoordinator`: the flush exchange with several processes;
* the NaN/Inf tracer, the remedies, and the hooks.

A Scope owns everything it creates through one ExitStack: the hooks on the model, the
process-wide patches (as a listener), the sinks. ``close()`` (idempotent; also run by
``__exit__`` and at interpreter exit) writes what is buffered, marks the run
completed/failed/interrupted, and removes every hook, also when training raised. Every entry
point from the user's program into the Scope runs under its :class:`~gradscope.guard.Guard`:
gradscope never raises into the training it watches.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__, patches, rundir
from .config import Config
from .events import Event, Finding
from .failures import InternalErrors
from .guard import CORE, EXIT, NOTEBOOK, REPORT, Guard
from .imports import own_imports
from .interrupts import held
from .layers import LayerTable
from .listener import PatchListener
from .meta import ENDED, RunJson, RunStatus, status_for, write_report_safely
from .naming import first_device, model_key, unwrap
from .outputs import Outputs
from .parts import Parts, build_parts
from .ranks import RankCoordinator
from .sinks.console import FindingPrinter

if TYPE_CHECKING:
    from .load import Run
    from .notebook import Cells, LiveView
    from .records import LongTable

_open_scopes: weakref.WeakSet[Scope] = weakref.WeakSet()


def watched_elsewhere(module: nn.Module, besides: Scope | None = None) -> Scope | None:
    """The open Scope other than ``besides`` that watches ``module``, if any (``gradscope
    run`` leaves a model alone that the script watches itself)."""
    return next(
        (s for s in list(_open_scopes) if s is not besides and s._table.contains(module)), None
    )


def _cells() -> Cells | None:
    """The cells of the running IPython (:class:`gradscope.notebook.Cells`); None outside
    IPython (never imports it)."""
    if "IPython" not in sys.modules:
        return None
    from .notebook import Cells

    return Cells.get()


def supersede(models: Mapping[str, nn.Module]) -> None:
    """Before ``watch()`` opens a scope on ``models``: close the open scopes it replaces, so no
    hook is doubled and nothing is left open by a cell run again.

    * one that watches any module of ``models`` (``watch()`` called again on the same model:
      a notebook cell re-run, a handle never closed);
    * in IPython, one that an earlier run of the cell running now opened: the cell builds a
      new model each time, the old scope would otherwise keep the old one alive until the
      kernel stops.

    Left alone: a scope whose ``with`` block is running (``watch()`` nested inside it, on
    purpose: each removes only its own hooks), and the scopes of ``gradscope run`` (they
    leave the script's own models to it)."""
    cells = None
    with contextlib.suppress(Exception):  # a shell of an unknown kind: no cells
        cells = _cells()
    cell = cells.here() if cells is not None else None
    for old in list(_open_scopes):
        if old._closed or old._launch is not None or old._entered:
            continue
        reason = None
        if any(old._table.contains(m) for root in models.values() for m in root.modules()):
            reason = "watch() was called again on the same model"
        elif (
            cell is not None
            and cell[0] is not None
            and old._cell is not None
            and old._cell[0] == cell[0]
            and old._cell[1] != cell[1]
        ):
            reason = "the cell that opened it ran again"
        if reason is not None:
            old._superseded(reason)


class Scope:
    """A watched run. Create it with :func:`gradscope.watch`.

    Args:
        models: ``{prefix: module}`` (see :func:`gradscope.naming.normalize_models`).
        optimizers: The optimizers to follow (empty: found at their first step).
        config: The validated configuration.
        label: For the default run name (the model's class).
        launch: How the process was started and where, when not as ``python`` in the working
            directory now (``gradscope run``), for run.json.
        callers: The ``torch.compile`` wrappers the user calls, by the id of the module each
            runs (:func:`gradscope.naming.compiled_callers`).

    Attributes:
        run_dir: The run directory (``docs/run-directory.md``).
        config: The validated configuration.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        config: Config,
        label: str,
        launch: tuple[list[str], str] | None = None,
        callers: Mapping[int, nn.Module] | None = None,
    ) -> None:
        self.config = config
        self._launch = launch
        self._callers = dict(callers or {})
        self._closed = False
        self._pid = os.getpid()
        self._errors: InternalErrors | None = None
        # every entry point from the user's program into this scope runs under this guard
        self._guard = Guard(self._internal_error)
        self._models = dict(models)
        self._table = LayerTable.build(self._models, config)
        self._table.check_watchable(optimizers, config)
        on_cpu = first_device(self._models).type == "cpu"
        # several processes (torchrun): every rank measures, rank 0 writes
        self._ranks = RankCoordinator.create(self._models, self._table, config)
        self._writer = self._ranks is None or self._ranks.writer
        name = config.name or rundir.default_name(label)
        self.run_dir = (
            rundir.create(config.out, name)
            if self._ranks is None
            else self._ranks.create_run_dir(config, name)
        )
        self._errors = InternalErrors(
            self._guard, self.run_dir, config.quiet, self._step_now, self._ranks
        )
        self._parts: Parts | None = None
        # in IPython (a notebook): the cell that opened this scope (key, run), and how the last
        # cell that trained it ended (gradscope.notebook.Cells)
        self._cell: tuple[str | None, int] | None = None
        self._outcome: RunStatus | None = None
        self._cell_moments = 0
        self._note = ""  # why the last training cell stopped; stands until training goes on
        self._note_moments = -1  # the clock's moments when it was written
        self._live: LiveView | None = None
        self._entered = 0  # inside its own ``with`` block: nested scopes are left alone
        self._stack = contextlib.ExitStack()
        if self._ranks is not None:
            self._stack.callback(self._ranks.release)
            self._guard.stops_measuring = frozenset()  # a rank stopping: the others would wait
        try:
            self._build(optimizers, on_cpu)
        except BaseException:
            self._stack.close()
            if self._writer:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _build(self, optimizers: Sequence[torch.optim.Optimizer], on_cpu: bool) -> None:
        config, guard, ranks = self.config, self._guard, self._ranks
        out = self._out = Outputs.create(guard, self.run_dir, config, ranks)
        assert self._errors is not None
        self._errors.record = out.record_late
        self._meta = RunJson(
            self.run_dir,
            config,
            self._launch,
            self._writer,
            out.write_meta,
            self._models,
            self._table,
            ranks,
        )
        # a notebook or an IPython shell: follow its cells
        cells = guard.isolate(NOTEBOOK, "notebook", _cells)
        console = FindingPrinter(quiet=config.quiet or not self._writer)
        if cells is not None:
            from .notebook import LiveView, in_kernel

            self._cell = cells.here()
            if not console.quiet and in_kernel(cells.shell):
                console = self._live = LiveView(
                    self.run_dir.name, str(self.run_dir), cells, self._repr_html_
                )
        parts = self._parts = build_parts(
            config,
            self._table,
            self._models,
            optimizers,
            guard,
            out,
            ranks,
            on_cpu,
            console=console,
            after_write=self._meta.due,
            stack=self._stack,
            launcher="run" if self._launch is not None else "watch",
            callers=self._callers,
        )
        self._clock, self._rec, self._flusher = parts.clock, parts.recorder, parts.flusher
        self._tracer, self._remedies = parts.tracer, parts.remedies
        if self._live is not None:
            self._flusher.on_flush = self._flushed
        self._meta.follow(parts.clock, parts.recorder.modules.site_names)
        try:
            self._meta.write(RunStatus.RUNNING, strict=True)
        except OSError as exc:
            raise ValueError(
                f"out={str(config.out)!r}: cannot write run.json in "
                f"{str(self.run_dir)!r} ({exc.strerror or exc})"
            ) from None
        self._stack.callback(
            patches.add_listener(PatchListener(parts, ranks, lambda: self._closed))
        )
        atexit.register(self._at_exit)
        self._stack.callback(atexit.unregister, self._at_exit)
        _open_scopes.add(self)
        self._stack.callback(_open_scopes.discard, self)
        if cells is not None:
            cells.follow(self)

    # -- public ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of steps completed so far."""
        return self._clock.step

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def parts(self) -> Parts:
        """The Scope's parts, for tests and debugging: a documented test hook, not a stable
        API (their attributes change with the implementation)."""
        assert self._parts is not None
        return self._parts

    @property
    def findings(self) -> list[Finding]:
        """Findings raised so far (JSON-shaped dicts, :data:`gradscope.events.Finding`;
        ``docs/run-directory.md``).

        Rules run at every flush (``flush_every``: by default every 100 steps, at most once in
        5 s; or ``flush_secs`` seconds) and at
        ``close()``; call :meth:`flush` first for an up-to-date list in the middle of a run."""
        return self._flusher.findings()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the remedies where they were: the clippers'
        histories (AutoClip's norms, ZClip's EMAs) and the guard's count of non-finite steps
        in a row. Save it beside the model's and the optimizer's; restore it with
        :meth:`load_state_dict` on the scope of the resumed run."""
        self._check_open("state_dict")
        return {"gradscope": __version__, "remedies": self._remedies.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before the first step of the resumed run).

        Raises:
            ValueError: ``state`` is not a gradscope state, or it was saved with another
                ``clip`` option.
        """
        self._check_open("load_state_dict")
        if not isinstance(state, dict) or "remedies" not in state:
            raise ValueError("load_state_dict: expected the dict Scope.state_dict() returned")
        self._remedies.load_state_dict(state["remedies"])

    def add_model(self, model: nn.Module, key: str | None = None) -> str:
        """Watch one more model in this run (a model built later: a GAN's second network, the
        model of a later training phase), or the parts added to one already watched.

        Args:
            model: The module (a ``torch.compile``d one too).
            key: Its name prefix. Default: the class name (``Discriminator.fc.weight``),
                made unique with a ``_1``, ``_2``... suffix. The key of a model already
                watched re-walks it: new submodules and parameters join under its names.

        Returns:
            The key (prefix) the model is watched under.

        Raises:
            TypeError: ``model`` is not a module.
            ValueError: ``key`` is not a plain name, or names another model already.
        """
        self._check_open("add_model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"add_model() expects an nn.Module, got {type(model).__name__}")
        model = unwrap(model)
        key = model_key(self._models, model, key)
        entries = self._table.extend({key: model}, self.config)
        self._models[key] = model
        self._tracer.add_model(key, model)
        if self._rec.replay is not None:
            self._rec.replay.add_model(model)
        self._rec.modules.attach_root(model)
        for entry in entries:
            self._rec.modules.attach_one(entry)
        if self._rec.modules.functional is not None:
            self._rec.modules.functional.attach_root(model)
        self._clock.forget_slots()
        if self._ranks is not None:
            self._ranks.map_shards()
        self._rec.follow_device(first_device(self._models).type == "cpu")
        self._meta.write(RunStatus.RUNNING)
        return key

    def add_event(self, record: dict[str, Any]) -> None:
        """Add an event to the run: a JSON-able dict with an ``"event"`` name, written to
        events.jsonl (a framework integration says which framework drives the loop;
        ``gradscope run`` says which model it found). TensorBoard's text shows only findings
        and remedy events.

        Raises:
            ValueError: ``record`` is not a dict with a string ``"event"``.
        """
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise ValueError(
                f"add_event: expected a dict with a string 'event' name, got {record!r:.80}"
            )
        if not self._closed:
            self._out.event(record if isinstance(record, Event) else Event.user(record))

    def optimizer_started(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``opt.step()`` began before this scope watched its parameters (``gradscope run``
        found the model inside it): count it as if its pre-hook had run now."""
        if not self._clock.in_optimizer_step:
            self._guard.call("optimizer-pre", self.parts.optimizer_hooks.pre, opt, args, kwargs)

    def started(self, module: nn.Module) -> None:
        """``module``'s forward has begun but its own forward-pre hook was registered too late
        to run (``gradscope run`` found the model by this very call): order it as if it had."""
        self._rec.modules.started(module)

    def step(self) -> None:
        """End the current step by hand (loops with no optimizer). From the first call on, steps
        end only here; gradients are read at the optimizer step if there is one, otherwise at the
        end of each backward pass."""
        self._check_open("step")
        self._clock.manual_step()

    def flush(self) -> None:
        """Copy buffered statistics to the host and write them to every sink now. With several
        processes, a collective: call it on every rank at the same step."""
        self._check_open("flush")
        self._guard.call("flush", self._flusher.flush)

    def load(self) -> Run:
        """Flush and read this run back (see :func:`gradscope.load_run`)."""
        from .load import load_run

        if not self._closed:
            self._guard.call("flush", self._flusher.flush)
        with own_imports():
            return load_run(self.run_dir)

    def close(self, status: str | None = None, exit_code: int | None = None) -> None:
        """Write everything, mark the run's status and remove every hook. Idempotent, and
        never raises: each stage (the last flush, findings.json, run.json, each sink, the
        report, the summary) runs under the guard, so one that fails (a full disk) costs
        itself, not the others, and the hooks always come off.

        Args:
            status: ``completed`` (default), ``failed`` or ``interrupted``.
            exit_code: The process's exit code, for run.json (``gradscope run`` sets it).

        Raises:
            ValueError: ``status`` is not one of those three.
        """
        if self._closed:
            return
        if status is not None and status not in ENDED:
            raise ValueError(f"status={status!r}: expected one of {', '.join(ENDED)}")
        self._closed = True
        self._meta.exit_code = exit_code
        try:
            if os.getpid() == self._pid:  # a forked child (DataLoader worker) never writes
                # a second Ctrl-C waits until the run directory is whole (interrupts.held)
                with own_imports(), held():
                    self._write_out(RunStatus(status or RunStatus.COMPLETED))
        finally:
            self._guard.stop()
            try:
                self._stack.close()  # the hooks come off
            except Exception as exc:
                self._internal_error("close", CORE, exc)
            with contextlib.suppress(Exception):
                self._release()

    def __enter__(self) -> Scope:
        self._entered += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered -= 1
        self.close(status_for(exc))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<gradscope.Scope {state} steps={self.steps} run_dir={str(self.run_dir)!r}>"

    def _repr_html_(self) -> str:
        """What a notebook shows for the scope: status, steps, the findings so far with what to
        try, and the gradient-flow heatmap of what was flushed (:mod:`gradscope.notebook`).
        Never raises: a failure shows the plain repr and why."""
        from .notebook import fallback_html

        try:
            return self._summary_html()
        except Exception as exc:
            return fallback_html(repr(self), exc)

    def _summary_html(self) -> str:
        from .notebook import HEAT_COLS, summary_html
        from .report.data import read_report_data

        data = None
        with contextlib.suppress(Exception), own_imports():  # the picture is a courtesy
            written = None if self._closed else self._out.written()
            data = read_report_data(self.run_dir, max_cols=HEAT_COLS, written=written)
        if self._closed:
            state = data.progress.state if data is not None else "closed"
            findings = data.findings if data is not None else []
        else:
            state = "running"
            findings = self._guard.isolate(NOTEBOOK, "notebook", self._flusher.findings) or []
        return summary_html(
            name=self.run_dir.name,
            state=state,
            steps=self.steps,
            findings=findings,
            path=str(self.run_dir),
            data=data,
            note=self._current_note(),
        )

    # -- the end --------------------------------------------------------------------------------
    def _write_out(self, status: RunStatus) -> None:
        """close()'s stages: what was measured, the findings, the status, the report."""
        guard, ranks = self._guard, self._ranks
        if ranks is not None and ranks.active and status != RunStatus.COMPLETED:
            ranks.stop(f"this rank ended {status}")  # the others may be gone: no collective
        guard.isolate(CORE, "close", self._clock.finish)
        guard.isolate(CORE, "close", self._flusher.flush)
        if ranks is not None:  # what the exchange never carried
            guard.isolate(CORE, "close", ranks.flush_outbox)
        findings = guard.isolate(CORE, "close", self._flusher.findings, True) or []
        self._out.write_findings(findings)
        self._meta.write(status)
        written = self._out.written()  # before the store closes: closing forgets them
        self._out.close()
        if self.config.report and self._writer:
            guard.call("report", write_report_safely, self.run_dir, self.config.quiet, written)
        if self._writer:
            guard.isolate(
                REPORT,
                "summary",
                self._flusher.console.summary,
                findings,
                self._clock.step,
                self.run_dir,
                str(status),
            )

    def _at_exit(self) -> None:
        """Interpreter exit with this scope still open (a handle never closed; in IPython: the
        kernel shutting down or restarting, with the status of the last cell that trained it)."""

        def close() -> None:
            if self._outcome is not None:
                self.close(self._outcome)
                return
            last = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
            self.close(status_for(last))

        self._guard.isolate(EXIT, "atexit", self._guard.call, "atexit", close)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"Scope.{what}(): this scope is closed (run in {self.run_dir})")

    def _release(self) -> None:
        self._rec.release()
        self._table.release()
        self._models.clear()

    # -- notebooks ------------------------------------------------------------------------------
    def _flushed(self, table: LongTable | None) -> None:
        """After each written flush, in a notebook: the live view (never the per-step path)."""
        live = self._live
        if live is not None:
            findings = self._flusher.findings()
            note = self._current_note()
            self._guard.isolate(
                NOTEBOOK, "live view", live.flushed, table, findings, self.steps, note
            )

    def _current_note(self) -> str:
        """Why the last training cell stopped, until training goes on (in any later cell)."""
        return self._note if self._clock.moments == self._note_moments else ""

    def _cell_ended(self, error: BaseException | None) -> None:
        """An IPython cell ended (``error``: what it raised). If this scope trained in it, the
        cell's outcome is the status the run closes with when it is never closed by hand. A
        cell interrupted (the stop button) or failed mid-training leaves the scope open, so the
        next cell can go on; a step cut short inside ``optimizer.step()`` is let go."""
        if self._closed:
            return
        steps, moments = self.steps, self._clock.moments
        trained = moments != self._cell_moments  # a backward pass or an optimizer step
        self._cell_moments = moments
        if not trained:
            return
        self._outcome = status_for(error)
        if error is None:
            return
        self._guard.call("flush", self._clock.abandon)
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        said = "was interrupted" if what == "interrupted" else "failed"
        self._note = (
            f"the cell {said} at step {steps} ({type(error).__name__}); the run is still "
            "open: run the training cell again to go on, or call close()"
        )
        self._note_moments = moments
        self.add_event(
            {"event": f"cell_{what}", "step": steps, "error": f"{type(error).__name__}: {error}"}
        )
        if self._live is not None:
            live = self._live
            findings = self._guard.isolate(NOTEBOOK, "notebook", self._flusher.findings) or []
            self._guard.isolate(
                NOTEBOOK,
                "live view",
                lambda: live.show(*live.live(findings, steps, what, self._note)),
            )
        elif not self.config.quiet and self._writer:
            print(f"gradscope: {self._note} ({self.run_dir})", file=sys.stderr, flush=True)

    def _superseded(self, reason: str) -> None:
        """A new ``watch()`` replaces this open scope (``reason``: why): close it with the
        status of the last cell that trained it (completed when none is known)."""
        status = self._outcome or RunStatus.COMPLETED
        self.add_event({"event": "superseded", "reason": reason, "step": self.steps})
        if self._live is not None:
            self._live.in_place = True
        if not self.config.quiet and self._writer:
            print(
                f"gradscope: closed the earlier run {self.run_dir} ({status}, {self.steps} "
                f"steps): {reason}",
                file=sys.stderr,
                flush=True,
            )
        self.close(str(status))

    # -- run.json -------------------------------------------------------------------------------
    def _step_now(self) -> int | None:
        return self._parts.clock.step if self._parts is not None else None

    # -- the guard ------------------------------------------------------------------------------
    def _internal_error(self, where: str, part: str, exc: BaseException) -> None:
        """The guard switched ``part`` off after ``exc`` in ``where``: an ``internal_error``
        event (if the store still writes) and one line on stderr. Never raises."""
        if self._errors is not None:
            self._errors(where, part, exc)
