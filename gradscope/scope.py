"""Scope: one watched training run, from ``watch()`` to ``close()``.

A Scope owns everything it creates through one ExitStack: the hooks on the model, the
process-wide patches (as a listener), the step buffer and the sinks. ``close()`` (idempotent; also
run by ``__exit__`` and at interpreter exit) writes what is buffered, marks the run
completed/failed/interrupted, and removes every hook, also when training raised.

Hooks are global state: while a Scope is open, its hooks run inside the user's forward, backward
and optimizer steps. They only measure (no I/O, no host reads on accelerators) and write into a
device buffer; all host work happens at flushes, every ``flush_every`` steps.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
import torch.optim.optimizer as _optim_mod
from torch import nn

from . import __version__, distributed, patches, rundir
from .buffer import StepBuffer
from .clock import Clock
from .config import Config
from .guard import (
    ACTIVATIONS,
    CORE,
    ENTRY_POINTS,
    EXIT,
    REMEDIES,
    REPORT,
    SAVE,
    STORE,
    TRACER,
    Guard,
)
from .hooks import Hook, HookSet
from .imports import own_imports
from .layers import LayerTable, ParamSlot
from .probes.activations import ModuleProbe
from .probes.grads import GradProbe
from .probes.nonfinite import NonfiniteTracer
from .probes.weights import WeightProbe
from .records import RUN_LAYER, LongTable
from .remedies import Remedies
from .rules.engine import FINDING_REMEDY_RULES, Diagnoser, layer_info
from .rules.nonfinite import traced_episode
from .sinks.console import FindingPrinter
from .sinks.store import Store

if TYPE_CHECKING:
    from .load import Run

STATUSES = ("running", "completed", "failed", "interrupted")
META_SECS = 10.0  # at most this long between run.json rewrites while running

_open_scopes: weakref.WeakSet[Scope] = weakref.WeakSet()


def watched_elsewhere(module: nn.Module, besides: Scope | None = None) -> Scope | None:
    """The open Scope other than ``besides`` that watches ``module``, if any (``gradscope
    run`` leaves a model alone that the script watches itself)."""
    return next((s for s in list(_open_scopes)
                 if s is not besides and s._table.contains(module)), None)


class Scope:
    """A watched run. Create it with :func:`gradscope.watch`.

    Attributes:
        run_dir: The run directory (see ``reports/README.md`` for its layout).
        config: The validated configuration.
        steps: Steps completed so far.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        config: Config,
        label: str,
    ) -> None:
        self.config = config
        self.command: list[str] | None = None  # how the process was started, if not python
        self.cwd: str | None = None  # where it was started, if not the working directory now
        self._closed = False
        self._degraded = False  # several ranks: an internal error turned measuring down
        self._recording_stopped = False  # the store failed (a full disk): said once
        self._pid = os.getpid()
        # every entry point from the user's program into this scope runs under this guard
        self._guard = Guard(self._internal_error)
        self._models = dict(models)
        self._table = LayerTable.build(self._models, config)
        if not self._table.params and not self._table.modules:
            raise ValueError(
                "nothing to watch: no trainable parameter or activation module passed the "
                f"filters (include={list(config.include)}, exclude={list(config.exclude)}, "
                f"include_types={config.to_json()['include_types']}, "
                f"exclude_types={config.to_json()['exclude_types']})"
            )
        for opt in optimizers:
            if not self._table.slots_of(p for g in opt.param_groups for p in g["params"]):
                raise ValueError(
                    f"optimizer {type(opt).__name__} steps none of the watched parameters; "
                    "pass the optimizer of this model, or no optimizer to find it automatically"
                )
        device = _first_device(self._models)
        on_cpu = device.type == "cpu"

        # several processes (torchrun): every rank measures, rank 0 writes (distributed.py)
        self._dist = distributed.Reducer.create()
        self._writer = self._dist is None or self._dist.rank == 0
        self._sharded: dict[str, float] = {}  # sharded parameter -> ranks holding each part
        self._bad_ranks: dict[int, dict[str, Any]] = {}  # rank -> its first non-finite value
        self._replicas_by_id: dict[int, int] = {}
        self._norm_factors: dict[Any, torch.Tensor] = {}
        if self._dist is not None:
            self._shard_map()
            fsdp1 = any(s.span is not None or (s.name in self._sharded and not s.dtensor)
                        for s in self._table.params)
            _check_distributed(config, fsdp1, any(s.dtensor and s.name in self._sharded
                                                  for s in self._table.params))
        self.run_dir = self._create_run_dir(label)
        self._stack = contextlib.ExitStack()
        if self._dist is not None:
            self._stack.callback(self._dist.release)
        try:
            self._started = time.time()
            self._last_flush = time.monotonic()
            self._buffer = StepBuffer(config.flush_every)
            # a shard's histogram is not a part of the whole one: none under FSDP
            self._grads = GradProbe(self._buffer, "host" if on_cpu else "flagged-only",
                                    histograms=config.tensorboard and config.histograms
                                    and not self._sharded)
            self._weights = WeightProbe(self._buffer, config.update_ratio)
            self._modules = ModuleProbe(self._buffer, self._table, config, count_on_host=on_cpu,
                                        guard=self._guard)
            self._modules.whole_masks = self._dist is not None
            self._store: Any = Store(self.run_dir) if self._writer else _RankOutbox(self._dist)
            self._sinks: list[Any] = [self._store]
            self._sink_entry: dict[int, str] = {id(self._store): "sink:store"}
            self._tb: Any = None  # reads the raw histogram columns too (Config.histograms)
            if config.tensorboard and self._writer:
                with own_imports():
                    from .sinks.tensorboard import TensorBoardSink

                self._tb = TensorBoardSink(self.run_dir / rundir.TB, config.tb_max_layers,
                                           raw=self._grads.histograms)
                self._sinks.append(self._tb)
                self._sink_entry[id(self._tb)] = "sink:tensorboard"
            if self._dist is not None:  # a rank stopping would leave the others waiting
                self._guard.stops_measuring = frozenset()
            self._clock = Clock(
                self._table, self, config.step_on, config.activation_every,
                config.update_every or config.activation_every, optimizers,
            )
            self._loss: torch.Tensor | None = None  # sum of the step's losses
            self._loss_count = 0
            self._scaler_seen = False
            self._skip_noted = False
            self._console = FindingPrinter(quiet=config.quiet or not self._writer)
            self._diagnoser = Diagnoser(
                config.thresholds, self._announce,
                sample_every=config.activation_every,
            ) if config.diagnose else None
            self._on_cpu = on_cpu
            self._cols = {
                name: self._buffer.group(((RUN_LAYER, "run", name),))
                for name in ("loss", "skipped_step", "amp_scale", "guard_skipped",
                             "grad_norm_total_clipped", "clip_coef", "clip_threshold")
            }
            # flushed from the buffer, not yet written by every sink (table, sinks done)
            self._pending: list[tuple[LongTable, set[int], int]] = []  # and its row count
            self._pending_rows = 0
            self._user_clipped: set[int] = set()  # slots the script clipped in this step
            self._user_clip_noted = False
            self._exit_code: int | None = None
            try:
                self._write_meta("running", strict=True)
            except OSError as exc:
                raise ValueError(f"out={str(config.out)!r}: cannot write run.json in "
                                 f"{str(self.run_dir)!r} ({exc.strerror or exc})") from None

            hooks = HookSet()
            self._hooks = hooks
            self._stack.callback(hooks.close)
            self._tracer = NonfiniteTracer(
                self._models, config.trace_nonfinite, immediate=on_cpu,
                report=self._on_traced, step=lambda: self._clock.step, guard=self._guard,
            )
            self._stack.callback(self._tracer.close)
            self._grads.on_nonfinite = self._on_nonfinite_flag
            self._trace_after_backward = self._guard.wrap(self._tracer.after_backward,
                                                          "tracer-backward")
            self._modules.attach(hooks)
            self._remedies: Remedies | None = None
            if config.clip or config.guard or config.swap or config.recycle:
                self._remedies = Remedies(
                    config.clip, config.swap, config.guard, config.recycle, self._table,
                    self._modules, self._models, self._event,
                    lambda f, r: f.setdefault("remedies", []).append(r),
                    patience_steps=config.thresholds.patience * config.activation_every,
                    on_replace=self._tracer.replace_module,
                )
                if self._dist is not None and self._sharded:
                    self._remedies.combine = self._combine_norms
                self._record({"event": "remedies", **self._remedies.describe()})
                for note in self._remedies.check_model():
                    self._record({"event": "remedy", "action": "inactive", "reason": note})
                    _warn(f"gradscope: {note}", stacklevel=3)
            self._remedy_warned = False
            self._hooks_verified = not self._table.modules
            pre = Hook(self._on_optimizer_pre, "optimizer-pre", self._guard, "optimizer-pre")
            post = Hook(self._on_optimizer_post, "optimizer-post", self._guard, "optimizer-post")
            if optimizers:
                for opt in optimizers:
                    hooks.add(opt.register_step_pre_hook(pre), "optimizer-pre")
                    hooks.add(opt.register_step_post_hook(post), "optimizer-post")
            else:  # find the optimizers that step these parameters when they first step
                hooks.add(_optim_mod.register_optimizer_step_pre_hook(pre), "optimizer-pre")
                hooks.add(_optim_mod.register_optimizer_step_post_hook(post), "optimizer-post")
            guard = self._guard
            self._before_backward = guard.wrap(self._clock.before_backward, "backward")
            self._after_backward = guard.wrap(self._clock.after_backward, "backward")
            self._scaler_step = guard.wrap(self._clock.scaler_step, "scaler")
            self._scaler_skipped = guard.wrap(self._on_scaler_skipped, "scaler")
            self._on_user_clip = guard.wrap(self._user_clip_impl, "clip")
            self._on_closure_clipped = guard.wrap(self._closure_clipped_impl, "clip")
            self._stack.callback(patches.add_listener(self))
            atexit.register(self._at_exit)
            self._stack.callback(atexit.unregister, self._at_exit)
            _open_scopes.add(self)
            self._stack.callback(_open_scopes.discard, self)
        except BaseException:
            self._stack.close()
            if self._writer:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _create_run_dir(self, label: str) -> Path:
        """The run directory; with several ranks, rank 0's, and its path on every rank."""
        config = self.config
        name = config.name or rundir.default_name(label)
        if self._dist is None:
            return rundir.create(config.out, name)
        made: Path | None = None
        error: BaseException | None = None
        if self._writer:
            try:
                made = rundir.create(config.out, name)
            except Exception as exc:  # told to the other ranks, then raised here
                error = exc
        path, problem = self._dist.broadcast(
            (str(made) if made else None, f"{type(error).__name__}: {error}" if error else None))
        if error is not None:
            raise error
        if problem is not None:
            raise RuntimeError(f"gradscope: rank 0 could not create the run directory ({problem})")
        return Path(path)

    def _shard_map(self) -> None:
        """Which watched parameters are sharded (FSDP), by name, and over how many replicas."""
        assert self._dist is not None
        replicas = distributed.replicas_of_shards(self._models.values(), self._dist.size)
        self._replicas_by_id = replicas
        self._sharded = {s.name: float(replicas[id(s.param)])
                         for s in self._table.params if id(s.param) in replicas}

    # -- public ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of steps completed so far."""
        return self._clock.step

    @property
    def closed(self) -> bool:
        return self._closed

    def _rank_evidence(self, findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With several ranks: which rank's own values (its loss, its activations) turned
        non-finite first; DDP then spreads the NaN into every rank's gradients."""
        if not self._bad_ranks:
            return findings
        own = {r: v for r, v in self._bad_ranks.items() if v["in"] != "gradients"} or \
            self._bad_ranks
        first = min(v["step"] for v in own.values())
        ranks = sorted(r for r, v in own.items() if v["step"] == first)
        for f in findings:
            if f["kind"] != "nonfinite":
                continue
            f["evidence"]["ranks"] = {str(r): v for r, v in sorted(self._bad_ranks.items())}
            if "on rank" not in f["message"]:
                which = ", ".join(map(str, ranks))
                f["message"] += (f" (first on rank{'s' if len(ranks) > 1 else ''} {which}, "
                                 f"in its {own[ranks[0]]['in']})")
        return findings

    @property
    def findings(self) -> list[dict[str, Any]]:
        """Findings raised so far (JSON-shaped dicts; see DESIGN.md and reports/README.md).

        Rules run at every flush (every ``flush_every`` steps or ``flush_secs`` seconds) and at
        ``close()``; call :meth:`flush` first for an up-to-date list in the middle of a run."""
        return self._rank_evidence(self._diagnoser.snapshot()) \
            if self._diagnoser is not None else []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the remedies where they were: the clippers'
        histories (AutoClip's norms, ZClip's EMAs) and the guard's count of non-finite steps
        in a row. Save it beside the model's and the optimizer's; restore it with
        :meth:`load_state_dict` on the scope of the resumed run."""
        self._check_open("state_dict")
        return {"gradscope": __version__,
                "remedies": self._remedies.state_dict() if self._remedies else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before the first step of the resumed run).

        Raises:
            ValueError: ``state`` is not a gradscope state, or it was saved with another
                ``clip`` option.
        """
        self._check_open("load_state_dict")
        if not isinstance(state, dict) or "remedies" not in state:
            raise ValueError("load_state_dict: expected the dict Scope.state_dict() returned")
        saved = state["remedies"]
        if saved is None and self._remedies is None:
            return
        if self._remedies is None:
            raise ValueError(f"load_state_dict: the state was saved with clip={saved['clip']!r}"
                             ", this scope has no remedy")
        if saved is None:
            saved = {"clip": None, "clippers": []}
        self._remedies.load_state_dict(saved)

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
        model = _unwrap(model)
        if key is None:
            key = next((k for k, m in self._models.items() if m is model), None)
            if key is None:
                base = model_label(model)
                key = base
                n = 0
                while key in self._models:
                    n += 1
                    key = f"{base}_{n}"
        if not isinstance(key, str) or "." in key or (not key and "" not in self._models):
            raise ValueError(f"add_model(): key {key!r} must be a non-empty string without '.'")
        if key in self._models and self._models[key] is not model:
            raise ValueError(f"add_model(): key {key!r} already names another model "
                             f"({type(self._models[key]).__name__})")
        entries = self._table.extend({key: model}, self.config)
        self._models[key] = model
        self._tracer.add_model(key, model)
        for entry in entries:
            self._modules.attach_one(entry)
        self._clock.forget_slots()
        if self._dist is not None:
            self._shard_map()
        self._follow_device()
        self._write_meta("running")
        return key

    def optimizer_started(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``opt.step()`` began before this scope watched its parameters (the model was found
        inside it): count it as if its pre-hook had run now."""
        if not self._clock.in_optimizer_step:
            self._guard.call("optimizer-pre", self._on_optimizer_pre, opt, args, kwargs)

    def started(self, module: nn.Module) -> None:
        """``module``'s forward has begun but its own forward-pre hook was registered too late
        to run (the model was found by this very call): order it as if it had."""
        self._modules.started(module)

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
        self._guard.call("flush", self._flush)

    def load(self) -> Run:
        """Flush and read this run back (see :func:`gradscope.load_run`)."""
        from .load import load_run

        if not self._closed:
            self._guard.call("flush", self._flush)
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
        if status is not None and status not in STATUSES[1:]:
            raise ValueError(f"status={status!r}: expected one of {', '.join(STATUSES[1:])}")
        self._closed = True
        self._exit_code = exit_code
        try:
            if os.getpid() == self._pid:  # a forked child (DataLoader worker) never writes
                with own_imports():
                    self._write_out(status or "completed")
        finally:
            self._guard.stop()
            try:
                self._stack.close()  # the hooks come off
            except Exception as exc:
                self._internal_error("close", CORE, exc)
            with contextlib.suppress(Exception):
                self._release()

    def _write_out(self, status: str) -> None:
        """close()'s stages: what was measured, the findings, the status, the report."""
        guard = self._guard
        dist = self._dist
        if dist is not None and dist.active and status != "completed":
            # the other ranks may be gone or still training: no collective now
            dist.stopped = f"this rank ended {status}"
        guard.isolate(CORE, "close", self._clock.finish)
        guard.isolate(CORE, "close", self._flush)
        if dist is not None and dist.outbox:  # what the exchange never carried
            outbox, dist.outbox = dist.outbox, []
            guard.isolate(CORE, "close", self._rank_events, outbox)
        findings = guard.isolate(CORE, "close", self._final_findings) or []
        self._sink_call(self._store, "write_findings", findings)
        self._write_meta(status)
        self._close_sinks()
        if self.config.report and self._writer:
            guard.call("report", write_report_safely, self.run_dir, self.config.quiet)
        if self._writer:
            guard.isolate(REPORT, "summary", self._console.summary, findings,
                          self._clock.step, self.run_dir, status)

    def _final_findings(self) -> list[dict[str, Any]]:
        findings = self.findings
        if self.command is not None:
            for f in findings:
                f["suggestion"] = command_line_hint(f["suggestion"])
        return findings

    def __enter__(self) -> Scope:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(_status_for(exc_type))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<gradscope.Scope {state} steps={self.steps} run_dir={str(self.run_dir)!r}>"

    # -- the guard --------------------------------------------------------------------------------
    def internal_error(self, where: str, exc: BaseException) -> None:
        """A patch's call into this scope raised (``patches.Listener``): switch its part off."""
        self._guard.fail(_PATCH_ENTRIES.get(where, "backward"), exc)

    def _internal_error(self, where: str, part: str, exc: BaseException) -> None:
        """The guard switched ``part`` off after ``exc`` in ``where``: an ``internal_error``
        event (if the store still writes) and one line on stderr. Never raises."""
        dist = self._dist
        several = dist is not None and dist.active
        if part == STORE and isinstance(exc, OSError):
            self._recording_stopped = True
            steps = getattr(getattr(self, "_clock", None), "step", 0)
            line = (f"gradscope: stopped recording: cannot write the run directory "
                    f"({exc.strerror or exc}: {exc.filename or self.run_dir}); training "
                    f"continues unwatched; what was written before step {steps} is in "
                    f"{self.run_dir}")
            _say(line)  # said even when quiet: the run directory cannot say it
            return
        if several and part == CORE:
            # The other ranks wait for this one in the next flush exchange: keep counting
            # steps and flushing; stop measuring what can be stopped.
            self._guard.off.discard(CORE)
            self._guard.off.update((ACTIVATIONS, TRACER))
            if self._degraded:
                return
            self._degraded = True
        record = {"event": "internal_error", "where": where, "part": part, "error": repr(exc),
                  "step": getattr(getattr(self, "_clock", None), "step", None)}
        if dist is not None:
            record["rank"] = dist.rank
        if hasattr(self, "_store") and self._guard.active(STORE):
            try:
                self._store.event(record)
            except Exception:  # closed already (the report runs last): append it directly
                if self._writer:
                    with contextlib.suppress(Exception):
                        rundir.append_event(self.run_dir, record)
        if several and part in (CORE, ACTIVATIONS, TRACER):
            what = ("activation statistics and the NaN tracer are off on this rank, and it "
                    "keeps taking part in the flushes (the other ranks wait for it there)")
        elif part in (CORE, STORE):
            what = "gradscope stopped watching"
        elif part == EXIT:
            what = "the run directory was not closed (run.json still says running)"
        else:
            what = f"the {_PART_NAMES.get(part, part)} switched off"
        rank = f" on rank {dist.rank}" if dist is not None else ""
        goes_on = "the program ends as it would have" if part == EXIT else \
            "training continues"
        if not self.config.quiet or part == STORE:
            _say(f"gradscope: internal error{rank} in {where}: {exc!r}; {what}; {goes_on} "
                 f"(records up to the last flush are in {self.run_dir})")

    def _record(self, record: dict[str, Any]) -> None:
        """An event for the store only (events.jsonl)."""
        self._sink_call(self._store, "event", record)

    def _sink_call(self, sink: Any, method: str, *args: Any) -> bool:
        """One sink's ``method``, under the guard (a full disk, a bug: that sink stops; the
        store stopping stops the recording). True when it ran."""
        entry = self._sink_entry.get(id(sink), "sink:store")
        part = ENTRY_POINTS[entry]
        if not self._guard.active(part):
            return False
        ran = [False]

        def call() -> None:
            getattr(sink, method)(*args)
            ran[0] = True

        self._guard.call(entry, call)
        return ran[0]

    def _close_sinks(self) -> None:
        """Close every sink, also one that failed before (to release its file)."""
        for sink in self._sinks:
            entry = self._sink_entry.get(id(sink), "sink:store")
            if self._guard.active(ENTRY_POINTS[entry]):
                self._sink_call(sink, "close")
            else:
                with contextlib.suppress(Exception):
                    sink.close()

    def _on_optimizer_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # torch passes the step's own positional args, the optimizer itself first
        closure = any(callable(a) for a in args if a is not opt) or callable(kwargs.get("closure"))
        self._clock.optimizer_pre(opt, closure)

    def _on_optimizer_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._clock.optimizer_post(opt)

    # patches.Listener ----------------------------------------------------------------------------
    # A backward pass concerns this scope only if one of its models ran a forward pass with
    # gradients since the last step: other models' backward passes (a second model trained in
    # the same process, an unwatched critic) are none of its business.
    def _ours(self) -> bool:
        """Whether the backward pass now is this scope's (with the activation hooks off after
        an error, nothing tells: every one counts)."""
        return self._modules.forward_seen or not self._guard.active(ACTIVATIONS)

    def before_backward(self, loss: torch.Tensor | None) -> None:
        if self._ours():
            self._before_backward()

    def after_backward(self, loss: torch.Tensor | None) -> None:
        if self._ours():
            self._after_backward(loss)
            if self._tracer.armed:
                self._trace_after_backward(loss)

    def user_clip(self, params: list[torch.Tensor], function: str,
                  detail: dict[str, Any]) -> None:
        self._on_user_clip(params, function, detail)

    def user_clipped(self, params: list[torch.Tensor]) -> None:
        if self._clock.in_optimizer_step and self._clock.row_open:
            self._on_closure_clipped(params)

    def _closure_clipped_impl(self, params: list[torch.Tensor]) -> None:
        """The script (a framework: Lightning's automatic optimization) clipped inside
        ``optimizer.step(closure)``: the statistics were taken after the closure's backward,
        before this clip; the norms after it are ``grad_norm_clipped``."""
        slots = self._table.slots_of(params)
        if slots:
            self._grads.record_clipped(slots)

    @contextlib.contextmanager
    def hooks_detached(self) -> Iterator[None]:
        """``torch.save`` is pickling: gradscope's hooks step out of the modules' hook dicts, so
        a saved model holds no trace of gradscope (it loads where gradscope is not installed)."""
        if self._closed or not self._guard.active(SAVE):
            yield  # (hooks left in place pickle to inert no-ops: hooks.InertHook)
            return
        self._guard.fault("save")  # the patch reports it: torch.save goes on
        with self._hooks.detached(), self._tracer.hooks.detached():
            yield

    def process_group_ending(self) -> None:
        """``destroy_process_group()`` on every rank, before this run closes: combine what the
        ranks buffered while the group exists; what follows is each rank's own."""
        if not self._closed:
            self._guard.call("process-group", self._group_ending)

    def _group_ending(self) -> None:
        dist = self._dist
        if dist is None or not dist.active:
            return
        try:
            self._flush()
        finally:
            dist.stopped = "the process group was destroyed"

    def scaler_step_begin(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        self._scaler_step(optimizer, getattr(scaler, "_scale", None))

    def scaler_skipped(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        self._scaler_skipped(optimizer)

    def _user_clip_impl(self, params: list[torch.Tensor], function: str,
                        detail: dict[str, Any]) -> None:
        """The script clips its own gradients (``clip_grad_norm_``/``clip_grad_value_``
        between ``backward()`` and ``step()``): take the gradient statistics now, as its clip
        sees them, so ``grad_norm`` shows an explosion the clip would hide; the norms after its
        clip are read at the optimizer step as ``grad_norm_clipped``."""
        if not self._clock.row_open or self._clock.in_optimizer_step:
            return  # not between a backward pass of ours and an optimizer step
        slots = [s for s in self._table.slots_of(params) if s.index not in self._user_clipped]
        if not slots:
            return
        self._grads.record(slots, self._clock.sampled_updates())
        self._user_clipped.update(s.index for s in slots)
        if not self._user_clip_noted:
            self._user_clip_noted = True
            self._event({"event": "script_clip", "step": self._clock.step,
                         "function": function, **detail,
                         "note": "grad_norm is read before the script's clip, "
                                 "grad_norm_clipped after it"})

    def _on_scaler_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._clock.slots_for(optimizer):
            return
        step = self._clock.step
        self._clock.scaler_skipped(optimizer)
        self._record(
            {"event": "skipped_step", "step": step, "by": "GradScaler",
             "reason": "inf/NaN in the scaled gradients; optimizer.step() was not called"}
        )

    # clock.Recorder ------------------------------------------------------------------------------
    def open_row(self, step: int) -> None:
        if self._flush_due():
            self._flush()
        self._buffer.open_row(step)

    def reopen_row(self, step: int, drop_current: bool) -> bool:
        return self._buffer.reopen(step, drop_current)

    def discard_row(self) -> None:
        self._buffer.discard_current()
        self._user_clipped.clear()
        self._loss, self._loss_count = None, 0
        self._skip_noted = False
        self._weights.cancel()
        self._modules.discard()

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
        if not clipped or at_backward or known_nonfinite:
            return self._grads.record(slots, self._clock.sampled_updates(), grad_scale,
                                      known_nonfinite, scaled)
        # the script clipped some of these itself: their statistics were taken before its
        # clip; what reaches the optimizer is recorded as grad_norm_clipped
        before = [s for s in slots if s.index not in clipped]
        after = [s for s in slots if s.index in clipped]
        parts = [m for m in (
            self._grads.record(before, self._clock.sampled_updates(), grad_scale)
            if before else None,
            self._grads.record_clipped(after, grad_scale),
        ) if m is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        (s1, g1, n1), (s2, g2, n2) = parts
        return s1 + s2, g1 + g2, torch.cat([n1, n2.to(n1.device)])

    def before_update(self, opt: torch.optim.Optimizer, measured: Any, grad_scale: Any) -> bool:
        """Right before ``opt`` updates the weights, after the statistics: the guard and
        clipping. True when the step is skipped."""
        rem = self._remedies
        if rem is None or not rem.at_step:
            return False
        skip, result = rem.before_step(opt, measured, grad_scale,
                                       patches.in_scaler_step(opt), self._clock.step)
        if skip:
            self.note_skipped(1.0)
            self._buffer.write_host(self._cols["guard_skipped"].cols[0], 1.0)
            return True
        if result is not None and measured is not None:
            slots = result.slots  # the watched ones, in the order the clipper saw them
            groups = self._grads._param_groups
            self._buffer.write(groups(slots, "grad_norm_clipped"), result.post)
            self._buffer.write(self._cols["grad_norm_total_clipped"], result.total_post)
            ratio = torch.where(result.total_pre > 0,
                                result.total_post / result.total_pre.clamp_min(1e-30),
                                torch.ones_like(result.total_pre))
            self._buffer.write(self._cols["clip_coef"], ratio)
            assert rem.clip is not None
            if rem.clip.per_layer or rem.clip.method == "agc":
                self._buffer.write(groups(slots, "clip_coef"), result.coef)
                if result.threshold is not None:
                    self._buffer.write(groups(slots, "clip_threshold"), result.threshold)
            elif result.threshold is not None:
                self._buffer.write(self._cols["clip_threshold"], result.threshold)
        return False

    def after_update(self, opt: torch.optim.Optimizer) -> None:
        if self._remedies is not None:
            self._remedies.after_step(opt)

    def snapshot_weights(self, slots: Sequence[ParamSlot]) -> None:
        self._weights.snapshot(slots)

    def update_weights(self) -> None:
        self._weights.update()

    def cancel_weights(self) -> None:
        self._weights.cancel()

    def end_window(self) -> None:
        self._modules.end_window()

    def set_sampling(self, sampled: bool) -> None:
        self._modules.sampling = sampled and self._guard.active(ACTIVATIONS)

    def note_loss(self, loss: torch.Tensor) -> None:
        # a running sum, not a list: a loop that never steps must not grow without bound
        loss = loss.reshape(())  # detached by the backward patch
        if self._on_cpu and self._tracer.mode != "off" and not self._tracer.done and \
                loss.is_floating_point() and not bool(torch.isfinite(loss)):
            self._tracer.flag(self._clock.step)  # free on the CPU: no device to wait for
        self._loss = loss if self._loss is None else self._loss + loss.to(self._loss.dtype)
        self._loss_count += 1

    def note_skipped(self, value: torch.Tensor | float) -> None:
        self._skip_noted = True
        if isinstance(value, torch.Tensor):
            self._buffer.write(self._cols["skipped_step"], value.float())
        else:
            self._buffer.write_host(self._cols["skipped_step"].cols[0], float(value))

    def note_scale(self, scale: torch.Tensor) -> None:
        self._scaler_seen = True
        # GradScaler.update() changes its scale tensor in place: keep this step's value
        self._buffer.write(self._cols["amp_scale"], scale.detach().clone())

    def commit_row(self) -> None:
        step = self._clock.step
        if not self._hooks_verified:
            self._check_hooks_run(step)
        self._modules.forward_seen = False
        self._user_clipped.clear()
        if self._loss is not None:
            loss = self._loss if self._loss_count == 1 else self._loss / self._loss_count
            self._buffer.write(self._cols["loss"], loss)
            self._loss, self._loss_count = None, 0
        if self._scaler_seen and not self._skip_noted:
            self._buffer.write_host(self._cols["skipped_step"].cols[0], 0.0)
        self._skip_noted = False
        self._modules.finalize()
        if self._tracer.armed:
            self._tracer.end_step()
        # the time-based flush is per process: with several ranks, flushes go by steps only
        due = self._dist is None and \
            time.monotonic() - self._last_flush >= self.config.flush_secs
        if self._flush_due() or due:
            self._flush()
        elif self._remedies is not None and self._remedies.needs_findings and \
                self._clock.sampled(step):
            self._flush(write=False)  # swap/recycle act on findings: diagnose every sample
        if self._remedies is not None and self._remedies.at_step and not self._remedy_warned \
                and self._clock.mode in ("backward", "manual"):
            self._remedy_warned = True
            note = ("clip= and guard= act at optimizer.step(); this loop updates the weights "
                    "without an optimizer, so they are not applied")
            self._event({"event": "remedy", "action": "inactive", "step": step, "reason": note})
            _warn(f"gradscope: {note}")

    def _check_hooks_run(self, step: int) -> None:
        """Steps end but no forward hook of ours has ever run: the forward passes bypass the
        watched modules' hooks. The usual cause is torch.compile: a compiled model called
        before ``watch()`` keeps its graph, and dynamo ignores hooks added after its first
        call. Say so once, instead of silently recording no activation statistics."""
        if self._modules.forward_ever:
            self._hooks_verified = True
            return
        if step < 2:
            return
        self._hooks_verified = True
        note = (f"no forward hook has run in {step + 1} steps: the model's forward passes do "
                "not go through the watched modules' hooks. Most likely the model was compiled "
                "and called before watch() (torch.compile ignores hooks added after its first "
                "call). Activation statistics, the backward signal and the NaN tracer are off "
                "for this run; gradient statistics are not affected. Call watch() before the "
                "first call of the compiled model, or torch._dynamo.reset() after watch().")
        self._event({"event": "hooks_inactive", "step": step, "reason": note})
        _warn(f"gradscope: {note}")

    # -- flush and metadata -----------------------------------------------------------------------
    def _flush_due(self) -> bool:
        return len(self._buffer.rows) + self._pending_rows >= self.config.flush_every

    def _flush(self, write: bool = True) -> None:
        """Copy the buffered steps to the host and diagnose them; ``write``: also write them
        (and everything diagnosed early) to the sinks. Early diagnosis (``write=False``)
        serves the remedies that act on findings, without a Parquet file per sample."""
        with own_imports():  # the first flush imports pyarrow: never the script's modules
            self._flush_now(write)

    def _flush_now(self, write: bool) -> None:
        if write:
            self._last_flush = time.monotonic()
            self._follow_device()
        # A step in progress (a flush() called mid-step) stays on the device. The rows stay
        # in the buffer until their table is pending, and a pending table stays until every
        # sink wrote it: a signal (or a failure) anywhere in a flush loses no record, and the
        # flush at close() writes what this one did not.
        taken = self._buffer.take(keep_current=self._clock.row_open)
        chunk = taken
        if self._dist is not None and self._dist.active:
            chunk = self._exchange(chunk)
        if chunk is not None:
            self._grads.complete(chunk)
            WeightProbe.complete(chunk)
            ModuleProbe.complete(chunk)
            table = LongTable.from_chunk(chunk)
            self._pending.append((table if self._grads.histograms else table.published(),
                                  set(), len(chunk.steps)))
            if taken is not None:
                self._buffer.forget(taken)
            self._pending_rows += len(chunk.steps)
            if self._diagnoser is not None:
                self._diagnose(table, early=not write)
        elif taken is not None:
            self._buffer.forget(taken)
        if not write:
            return
        if self._pending:
            self._write_pending()
        # run.json is a status file, not the record: rewrite it when the layer list grew or
        # every META_SECS, not at every flush (the loader counts steps from the metrics)
        if self._layer_count() != self._meta_shape or \
                time.monotonic() - self._meta_time >= META_SECS:
            self._write_meta("running")

    def _write_pending(self) -> None:
        """Every pending table to every sink that has not written it yet; a table leaves
        ``_pending`` once all have (a sink switched off counts as done: it writes no more)."""
        published_all: list[LongTable] = []
        for sink in self._sinks:
            key = id(sink)
            todo = [t for t, done, _ in self._pending if key not in done]
            if not todo:
                continue
            raw = LongTable.concat(todo)
            table = raw if sink is self._tb or not self._grads.histograms else raw.published()
            if self._sink_call(sink, "write", table):
                for _, done, _ in self._pending:
                    done.add(key)
                if sink is self._store:
                    published_all.append(table)
        live = {id(s) for s in self._sinks
                if self._guard.active(ENTRY_POINTS[self._sink_entry.get(id(s), "sink:store")])}
        self._pending = [p for p in self._pending if not live <= p[1]]
        self._pending_rows = sum(p[2] for p in self._pending)
        for table in published_all:
            self._summarize_clipping(table)

    def _follow_device(self) -> None:
        """The model moved (``.to("cuda")`` after a first forward on the CPU, which is where
        ``gradscope run`` may have found it): host reads are free on the CPU only."""
        on_cpu = _first_device(self._models).type == "cpu"
        if on_cpu == self._on_cpu:
            return
        self._on_cpu = on_cpu
        self._grads.count_policy = "host" if on_cpu else "flagged-only"
        self._modules.count_on_host = on_cpu
        self._tracer.immediate = on_cpu

    # -- diagnosis --------------------------------------------------------------------------------
    def _diagnose(self, table: LongTable, early: bool = False) -> None:
        """Run the rules on newly flushed records. ``early`` (a sample between flushes, for the
        remedies that act on findings): only the rules those remedies read."""
        assert self._diagnoser is not None
        info = layer_info(self._table.describe(), self._modules.site_names())
        self._diagnoser.update(table, info, FINDING_REMEDY_RULES if early else None)
        for error in self._diagnoser.errors:
            self._record({"event": "internal_error", "where": "rules", "error": error})
        self._diagnoser.errors.clear()
        if self._remedies is not None and self._remedies.needs_findings:
            # a remedy bug must not take training down: the remedies switch off
            self._guard.isolate(REMEDIES, "remedies", self._remedies.on_findings,
                                self._diagnoser.findings, self._clock.step,
                                self._clock.optimizers())

    def _event(self, record: dict[str, Any]) -> None:
        """An event for every sink that keeps events (events.jsonl, TensorBoard text)."""
        for sink in self._sinks:
            self._sink_call(sink, "event", record)

    def _summarize_clipping(self, table: LongTable) -> None:
        """One ``clipped`` event per flush: how many steps clipping changed, and by how much
        (per-step coefficients are in the records)."""
        import numpy as np

        if self._remedies is None or self._remedies.clip is None:
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
            self._event({
                "event": "remedy", "remedy": "clip", "action": "clipped",
                "method": str(self._remedies.clip), "steps": [int(steps[0]), int(steps[-1])],
                "clipped_steps": int(clipped.sum()), "of_steps": int(rows.sum()),
                "min_coef": float(coef[clipped].min()),
                "median_coef": float(np.median(coef[clipped])),
            })

    def _announce(self, finding: dict[str, Any], new: bool) -> None:
        if self.command is not None:  # gradscope run: options are flags, not watch() keywords
            finding = {**finding, "suggestion": command_line_hint(finding["suggestion"])}
        self._event({"event": "finding" if new else "finding_updated", **finding})
        self._console.announce(finding, new)

    def _on_nonfinite_flag(self) -> None:
        """The gradient probe saw a non-finite gradient: arm the tracer (its part only)."""
        self._guard.isolate(TRACER, "tracer-flag", self._tracer.flag, self._clock.step)

    def _on_traced(self, info: dict[str, Any]) -> None:
        """The tracer named where the first non-finite value came from. With several ranks,
        every rank hears of it at the next flush (the rank is part of the finding)."""
        if self._dist is not None:
            self._dist.outbox.append({"event": "nonfinite_traced", **info,
                                      "rank": self._dist.rank})
            if self._dist.active:
                return
            outbox, self._dist.outbox = self._dist.outbox, []
            self._rank_events(outbox)
            return
        self._record({"event": "nonfinite_traced", **info})
        if self._diagnoser is None:
            return
        self._diagnoser.merge(traced_episode(info))

    # -- several ranks ----------------------------------------------------------------------------
    def _exchange(self, chunk: Any) -> Any:
        """Combine this flush's records with the other ranks' (the same result on every rank)."""
        dist = self._dist
        assert dist is not None
        if chunk is not None and dist.rank not in self._bad_ranks:
            first = _first_nonfinite(chunk)
            if first is not None:  # which rank it came from: the rank's own loss/activations
                self._bad_ranks[dist.rank] = first
                dist.outbox.append({"event": "nonfinite_rank", "rank": dist.rank, **first})
        try:
            merged, events = dist.exchange(chunk, self._reduction)
        except Exception as exc:  # a rank gone, a timeout: keep this rank's own records
            dist.stopped = repr(exc)
            note = (f"the ranks stopped combining their records ({exc!r}); from step "
                    f"{self._clock.step} on, rank {dist.rank}'s own records are written")
            self._record({"event": "distributed", "action": "stopped", "rank": dist.rank,
                          "step": self._clock.step, "reason": note})
            _warn(f"gradscope: {note}")
            return chunk
        self._rank_events(events)
        return merged

    def _rank_events(self, events: list[dict[str, Any]]) -> None:
        """Events of every rank: rank 0 writes them; a traced NaN/Inf joins every rank's
        findings, the earliest first (forward before backward, lower rank first)."""
        order = {"forward": 0, "backward": 1, "optimizer": 2}
        traced = sorted((e for e in events if e.get("event") == "nonfinite_traced"),
                        key=lambda e: (int(e.get("step", 0)), order.get(str(e.get("phase")), 3),
                                       int(e.get("rank", 0))))
        for e in [e for e in events if e.get("event") != "nonfinite_traced"] + traced:
            if e.get("event") == "nonfinite_rank":
                self._bad_ranks[int(e["rank"])] = {"step": e["step"], "in": e["in"]}
            if self._writer:
                self._record(e)
        for e in traced:
            if self._diagnoser is not None:
                info = {k: v for k, v in e.items() if k != "event"}
                self._diagnoser.merge(traced_episode(info))

    def _combine_norms(self, params: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """Each parameter's gradient norm over all ranks, from this rank's parts' norms: one
        all-reduce of the squares on the training's process group, on the norms' device (no
        host read), each divided by how many ranks hold the same part."""
        assert self._dist is not None
        key = (tuple(id(p) for p in params), norms.device)
        factors = self._norm_factors.get(key)
        if factors is None:
            size = self._dist.size
            factors = torch.tensor([1.0 / self._replicas_by_id.get(id(p), size) for p in params],
                                   dtype=norms.dtype, device=norms.device)
            if len(self._norm_factors) > 16:
                self._norm_factors.clear()
            self._norm_factors[key] = factors
        sq = norms.square() * factors
        torch.distributed.all_reduce(sq)
        return sq.sqrt()

    def _reduction(self, key: tuple[str, str, str]) -> tuple[str, float]:
        """How a record column combines across ranks (see distributed.py)."""
        layer, kind, metric = key
        if kind == "param":
            replicas = self._sharded.get(layer)
            if replicas is None:  # replicated: DDP averaged it already
                return distributed.LOCAL, 1.0
            return _SHARD_OPS.get(metric, distributed.LOCAL), 1.0 / replicas
        if kind == "module":
            if metric == "output_grad_norm":
                # the data-parallel loss is the mean of the ranks' losses: each rank's output
                # gradient is 1/size of its share of the global one
                size = self._dist.size if self._dist is not None else 1
                return distributed.L2, 1.0 / size**2
            return _SITE_OPS.get(metric, distributed.LOCAL), 1.0
        return _RUN_OPS.get(metric, distributed.LOCAL), 1.0

    def _layer_count(self) -> tuple[int, int]:
        """Modules seen running and activation sites: what run.json's layer lists hold."""
        return self._table.executed_count(), len(self._modules.site_names())

    def _write_meta(self, status: str, strict: bool = False) -> None:
        """Rewrite run.json (through the store's guard; ``strict``: raise, in ``watch()``)."""
        self._meta_time = time.monotonic()
        self._meta_shape = self._layer_count()
        if not self._writer:
            return
        if strict:
            self._write_meta_now(status)
        else:
            self._guard.call("sink:store", self._write_meta_now, status)

    def _write_meta_now(self, status: str) -> None:
        extra: dict[str, Any] = {}
        if self._dist is not None:
            extra["distributed"] = {
                "world_size": self._dist.size,
                "backend": self._dist.backend,
                "sharded_params": len(self._sharded),
                "combined": self._dist.stopped is None or "destroyed" in self._dist.stopped,
                "stopped": self._dist.stopped,
            }
        meta = run_meta(
            self.config, status, command=self.command or [Path(sys.executable).name, *sys.argv],
            cwd=self.cwd or os.getcwd(), pid=self._pid, started=self._started,
            exit_code=None if status == "running" else self._exit_code,
            models={k: model_label(m) for k, m in self._models.items()},
            steps=self._clock.step, step_mode=self._clock.mode,
            layers=self._table.describe(), sites=self._modules.site_names(), **extra,
            **({"world_size": self._dist.size} if self._dist is not None else {}),
        )
        rundir.write_json(self.run_dir / rundir.RUN_JSON, meta)

    def _at_exit(self) -> None:
        """Interpreter exit with this scope still open (a handle never closed)."""

        def close() -> None:
            status = "completed"
            last = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
            if last is not None:
                status = _status_for(type(last))
            self.close(status)

        self._guard.isolate(EXIT, "atexit", self._guard.call, "atexit", close)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"Scope.{what}(): this scope is closed (run in {self.run_dir})")

    def _release(self) -> None:
        self._modules.release()
        self._weights.release()
        self._buffer.release()
        self._table.release()
        self._models.clear()
        self._loss = None


_PATCH_ENTRIES = {  # a patch's listener call (patches._notify) -> its entry point
    "patch:before_backward": "backward", "patch:after_backward": "backward",
    "patch:user_clip": "clip", "patch:user_clipped": "clip",
    "patch:scaler_step_begin": "scaler", "patch:scaler_skipped": "scaler",
    "patch:torch.save": "save", "patch:process_group_ending": "process-group",
}
_PART_NAMES = {ACTIVATIONS: "activation statistics", TRACER: "NaN/Inf tracer",
               REMEDIES: "remedies", REPORT: "report", SAVE: "hook removal in torch.save",
               "tensorboard": "TensorBoard sink", EXIT: "exit handler"}


def _say(line: str) -> None:
    """One line on stderr, never an exception (a closed stderr, a broken pipe)."""
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr, flush=True)


def _warn(message: str, stacklevel: int = 2) -> None:
    """A RuntimeWarning; where warnings are errors (``python -W error``, pytest) one line on
    stderr instead: a warning of gradscope's must not raise into the training loop."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    except Exception:
        _say(message)


_SHARD_OPS = {  # a sharded parameter's records: its parts' norms, peaks and counts
    "grad_norm": distributed.L2, "grad_norm_clipped": distributed.L2,
    "weight_norm": distributed.L2, "_delta_norm": distributed.L2,
    "grad_max_abs": distributed.MAX, "grad_nonfinite": distributed.SUM,
}
_SITE_OPS = {  # an activation site's raw statistics (ModuleProbe.complete derives the rest)
    "_sum": distributed.SUM, "_l2": distributed.L2, "_sat": distributed.SUM,
    "_nonfinite": distributed.SUM, "_n": distributed.SUM, "_rows": distributed.SUM,
    "_units": distributed.MAX, "_dead": distributed.UNITS,
}
_RUN_OPS = {"loss": distributed.MEAN, "skipped_step": distributed.MAX,
            "guard_skipped": distributed.MAX}


class _RankOutbox:
    """The store of a rank other than 0: writes nothing; the events that concern the run
    (an internal error on this rank) travel to rank 0 at the next flush."""

    def __init__(self, dist: distributed.Reducer | None) -> None:
        self._dist = dist

    def write(self, table: LongTable) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        if self._dist is not None and record.get("event") in ("internal_error", "distributed"):
            self._dist.outbox.append({**record, "rank": self._dist.rank})

    def write_findings(self, findings: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def _first_nonfinite(chunk: Any) -> dict[str, Any] | None:
    """This rank's first step with a non-finite loss, activation or gradient, before the
    ranks' records are combined."""
    import numpy as np

    found: list[tuple[int, int, str]] = []
    for c, (_, kind, metric) in enumerate(chunk.columns):
        if metric == "loss":
            bad = chunk.written[:, c] & ~np.isfinite(chunk.values[:, c])
            where, rank = "loss", 0
        elif kind == "module" and metric == "_nonfinite":
            bad = chunk.written[:, c] & (chunk.values[:, c] > 0)
            where, rank = "activations", 0
        elif kind == "param" and metric == "grad_norm":
            bad = chunk.written[:, c] & ~np.isfinite(chunk.values[:, c])
            where, rank = "gradients", 1
        else:
            continue
        rows = np.flatnonzero(bad)
        if rows.size:
            found.append((int(chunk.steps[rows[0]]), rank, where))
    if not found:
        return None
    step, _, where = min(found)
    return {"step": step, "in": where}


def _check_distributed(config: Config, fsdp1: bool, fsdp2: bool) -> None:
    """Remedies that would act differently on each rank are refused, in one line."""
    if config.recycle:
        raise ValueError("recycle=True is not supported with several processes (each rank "
                         "would re-initialise different units); use swap= instead")
    if fsdp1 and (config.clip or config.guard):
        option = f"clip='{config.clip}'" if config.clip else f"guard={config.guard!r}"
        raise ValueError(f"{option} is not supported on FSDP1 (FullyShardedDataParallel) "
                         "parameters: use its own clip_grad_norm_ (gradscope records the norms "
                         "before and after it), or FSDP2 (fully_shard), where it is")
    if fsdp2 and config.clip and config.clip.method == "agc":
        raise ValueError(f"clip='{config.clip}': AGC is not supported on sharded (FSDP2) "
                         "parameters; use norm, autoclip or zclip")


_WATCH_HINT = re.compile(r"gradscope\.watch\(\.\.\., (\w+)=('[^']*'|\w+)\)")


def command_line_hint(text: str) -> str:
    """A finding's suggestion for ``gradscope run`` users: ``gradscope.watch(..., swap='a')``
    becomes ``gradscope run --swap 'a' ...``, ``recycle=True`` and ``guard=True`` become the
    bare flags ``--recycle`` and ``--guard``."""

    def flag(match: re.Match[str]) -> str:
        key, value = match.group(1).replace("_", "-"), match.group(2)
        if value != "True":
            return f"gradscope run --{key} {value} ..."
        return f"gradscope run --{key} ..." if key in ("recycle", "guard") else \
            f"gradscope run --{key} true ..."

    return _WATCH_HINT.sub(flag, text)


def run_meta(config: Config, status: str, *, command: list[str], cwd: str, pid: int,
             started: float, exit_code: int | None, models: dict[str, str], steps: int,
             step_mode: str | None, layers: list[dict[str, Any]], sites: list[str],
             **extra: Any) -> dict[str, Any]:
    """run.json's content (the run-directory contract; see reports/README.md)."""
    return {
        "gradscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(command),
        "argv": list(sys.argv),
        "cwd": cwd,
        "pid": pid,
        "host": socket.gethostname(),  # with pid: whether a "running" run is still alive
        "config": config.to_json(),
        "models": models,
        "started": _iso(started),
        "ended": None if status == "running" else _iso(time.time()),
        "status": status,
        "exit_code": exit_code,
        "world_size": _world_size(),
        "steps": steps,
        "step_mode": step_mode,
        "layers": layers,
        "sites": sites,
        **extra,
    }


def write_report_safely(run_dir: Path, quiet: bool) -> None:
    """report.html, from what was just written; a failure costs the report, not the run
    (an ``internal_error`` event, and ``gradscope report RUN`` can write it again)."""
    try:
        from .report import write_report

        write_report(run_dir)
    except Exception as exc:
        with contextlib.suppress(Exception):
            rundir.append_event(run_dir, {"event": "internal_error", "where": "report",
                                          "error": repr(exc)})
        if not quiet:
            print(f"gradscope: report.html not written ({exc!r}); the records are complete: "
                  f"gradscope report {run_dir}", file=sys.stderr, flush=True)


def _status_for(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "completed"
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted"
    if issubclass(exc_type, SystemExit):
        return "completed"
    return "failed"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _first_device(models: Mapping[str, nn.Module]) -> torch.device:
    for model in models.values():
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _unwrap(m: Any) -> Any:
    """torch.compile's OptimizedModule, DDP, DataParallel: hook (and name) the module they
    run. FSDP1 stays: its flat parameters live on the wrapper (their names are cleaned)."""
    from .attach import _wrapped

    return _wrapped(m) if isinstance(m, nn.Module) else m


def model_label(m: nn.Module) -> str:
    """The class name a user knows: FSDP2's ``fully_shard`` makes ``FSDPNet`` of ``Net``,
    FSDP1 wraps the model."""
    inner = getattr(m, "_fsdp_wrapped_module", None)
    if isinstance(inner, nn.Module):
        m = inner
    name = type(m).__name__
    if name.startswith("FSDP") and any(b.__name__ == name[4:] for b in type(m).__mro__[1:]):
        return name[4:]  # FSDP2's class(FSDPModule, Sequential)
    return name


def normalize_models(models: Any) -> tuple[dict[str, nn.Module], str]:
    """``watch()``'s first argument as ``{prefix: module}`` plus a label for the run name."""

    def bad(value: Any) -> TypeError:
        return TypeError(
            f"watch() expects an nn.Module, or a list or dict of them; got "
            f"{type(value).__name__} ({value!r:.60})"
        )

    if isinstance(models, nn.Module):
        m = _unwrap(models)
        return {"": m}, model_label(m)
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, Iterable) and not isinstance(models, (str, bytes)):
        mods = list(models)
        names = [model_label(_unwrap(m)) for m in mods]
        keys = names if len(set(names)) == len(names) else [str(i) for i in range(len(mods))]
        items = list(zip(keys, mods))
    else:
        raise bad(models)
    if not items:
        raise bad(models)
    out: dict[str, nn.Module] = {}
    for key, m in items:
        if not isinstance(m, nn.Module):
            raise bad(m)
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"watch(): model key {key!r} must be a non-empty string without '.'")
        out[key] = _unwrap(m)
    return out, "-".join(model_label(m) for m in out.values())


def normalize_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(opts, Iterable):
        opts = [opts]
    out = list(opts)
    for opt in out:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer={opt!r:.60}: expected a torch.optim.Optimizer (or a list of them), "
                f"got {type(opt).__name__}"
            )
    return out
