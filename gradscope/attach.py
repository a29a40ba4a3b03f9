"""Watching code that never calls ``watch()``: models are found as they first train.

``gradscope run`` cannot be told which model to watch, so it installs one process-wide forward
pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) and treats a module call
as a *new model* when all of these hold:

* it runs eagerly: dynamo traces global hooks into compiled graphs, so the check is skipped while
  compiling (a ``torch.compile``d model is found through the call of its ``OptimizedModule``
  wrapper, which is eager, and watched through ``_orig_mod``);
* gradients are enabled: a forward under ``no_grad``/``inference_mode`` is evaluation;
* it runs in the process that started the run (DataLoader workers are forks of it);
* it is not part of a model already watched, here or by a ``watch()`` in the script itself;
* it owns a parameter that requires a gradient (loss modules such as ``nn.CrossEntropyLoss``
  have none; nor does a frozen feature extractor, rechecked after each optimizer step in case
  it is unfrozen).

A parent's pre-hook runs before its children's, so the model found is the outermost module the
script called: the whole network, not its first layer. A model wrapped for data parallelism
(``DistributedDataParallel``, ``DataParallel``) is watched through its ``.module``. The first
model found names its parameters as ``watch()`` would (``fc1.weight``); later ones get their class
name as a prefix (``Discriminator.fc1.weight``), made unique with ``_1``, ``_2``... A module added
to a watched model later (a new layer) joins under the model's names.

The hook runs for every module call in the process. For a module already watched it costs one
``is_compiling()`` call and one dictionary lookup; the search runs only for modules not yet
classified, and its verdict is cached. Once every parameter of every optimizer that steps
belongs to a watched model the hook is taken away (a global hook sends every module call
through ``nn.Module``'s slow path), and put back at the step of an optimizer that holds a
parameter no watched model owns; a module that is called but trained by no optimizer is then
not found (a layer added to a model later is found when its parameters join an optimizer).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as _optim_mod
from torch import nn

from . import distributed, rundir
from .compat import is_compiling
from .config import Config
from .events import Event
from .guard import DISCOVERY, Guard
from .hooks import Hook, HookSet
from .imports import own_imports
from .meta import run_meta, write_report_safely
from .naming import model_label, wrapped
from .scope import Scope, watched_elsewhere

# OptimizedModule.__call__ warns whenever any global module hook exists: ours is expected, and
# the extra call of the wrapper is handled (it is unwrapped, below).
_COMPILE_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"
PRUNE_AT = 4096  # entries of the not-a-model cache before dead ones are dropped


class Attach:
    """Finds the models a script trains and watches them in one Scope (created at the first).

    Args:
        config: The run's configuration (validated).
        command: How gradscope was started (``gradscope run ...``), for run.json.
    """

    def __init__(self, config: Config, command: list[str]) -> None:
        self.config = config
        self.command = command
        self.cwd = os.getcwd()  # the script may chdir: run.json records where it started
        self.scope: Scope | None = None
        self.models: list[tuple[str, nn.Module]] = []  # (key, root) in the order found
        self.deferred: list[Path] = []  # run directories of models the script watches itself
        self._pid = os.getpid()
        self._started = time.time()
        self._known: dict[int, nn.Module] = {}  # modules of watched models (and wrappers), by id
        # classified as not a model: no parameter at all (kept), or none trainable (rechecked
        # after each optimizer step); weak, so a dead module's id cannot be mistaken
        self._paramless: dict[int, weakref.ref[nn.Module]] = {}
        self._frozen: dict[int, weakref.ref[nn.Module]] = {}
        # the discovery hooks run inside the script: an error stops the search, not the script
        self.guard = Guard(self._internal_error)
        self._hooks = HookSet()
        self._discover_hook = Hook(self._on_forward_pre, "discover", self.guard, "discover")
        self._discovering: Any = None  # the global forward pre-hook's handle, while it is on
        self._resume()
        # optimizer -> ((models found, params per group), every parameter watched?)
        self._coverage: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = (
            weakref.WeakKeyDictionary()
        )
        self.pauses = 0  # times the search was paused (tests)
        self._stepping: list[tuple[Any, Any, Any]] = []  # optimizers inside step(), with args
        self._hooks.add(
            _optim_mod.register_optimizer_step_pre_hook(
                Hook(self._on_step_pre, "in-step", self.guard, "discover")
            ),
            "in-step",
        )
        self._hooks.add(
            _optim_mod.register_optimizer_step_post_hook(
                Hook(self._on_step, "recheck", self.guard, "discover")
            ),
            "recheck",
        )
        warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)
        self._filter = warnings.filters[0]
        self._patch_compile()

    def _patch_compile(self) -> None:
        """``model.compile()`` (in place) runs the whole ``_call_impl``, global hooks included,
        inside dynamo, where nothing can be discovered: give such a module an eager first look
        before its compiled call (then the watch's own hooks are there when dynamo traces)."""
        original = nn.Module.__dict__.get("compile")
        if original is None:  # torch without Module.compile
            self._compile_original = None
            return
        attach_ref = weakref.ref(self)

        def compile(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            original(module, *args, **kwargs)
            compiled = module.__dict__.get("_compiled_call_impl")
            if compiled is None:
                return
            module_ref = weakref.ref(module)

            def call(*a: Any, **k: Any) -> Any:
                attach = attach_ref()
                target = module_ref()
                if (
                    attach is not None
                    and target is not None
                    and attach._known.get(id(target)) is not target
                ):
                    attach.guard.call("discover", attach._consider, target)
                return compiled(*a, **k)

            module._compiled_call_impl = call

        compile.__doc__ = original.__doc__
        compile.__gradscope__ = True  # type: ignore[attr-defined]
        nn.Module.compile = compile  # type: ignore[method-assign,assignment]
        self._compile_original = original

    # -- hooks ------------------------------------------------------------------------------------
    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        # The hot path, once per module call in the process: keep it this short.
        if is_compiling() or self._known.get(id(module)) is module:
            return
        self._consider(module)

    def _on_step_pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        # (a step that raised never reached its post-hook: drop what it left)
        self._stepping = [e for e in self._stepping if e[0] is not opt]
        self._stepping.append((opt, args, kwargs))
        if self._discovering is None and not self._covered(opt):
            self._resume()  # this optimizer trains something not watched yet: look again

    def _on_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._stepping = [e for e in self._stepping if e[0] is not opt]
        self._frozen.clear()  # a frozen module may have been unfrozen: look again
        if (
            self._discovering is not None
            and self.scope is not None
            and not self._stepping
            and all(self._covered(o) for o in [*self._coverage.keys(), opt])
        ):
            self._pause()

    # -- pausing the search -------------------------------------------------------------------
    # The discovery hook is global: while it is on, every module call in the process takes
    # nn.Module's slow call path and one Python call, which on a model of thousands of modules
    # costs more than watching it. Once every parameter of every optimizer that steps belongs
    # to a watched model, there is nothing left to find: the hook is taken away, and put back
    # at the step of an optimizer that holds a parameter no watched model owns (a new
    # parameter group, a second model's optimizer). Loops with no optimizer keep it.
    def _covered(self, opt: Any) -> bool:
        """Whether every parameter ``opt`` steps belongs to a watched model (cached by the
        models found and the optimizer's group sizes)."""
        groups = getattr(opt, "param_groups", None)
        if not isinstance(groups, list):
            return False
        sig = (len(self.models), tuple(len(g.get("params", ())) for g in groups))
        known = self._coverage.get(opt)
        if known is not None and known[0] == sig:
            return known[1]
        self._regrow()  # a new or changed optimizer: a model found earlier may have grown
        watched = {id(p) for _, m in self.models for p in m.parameters()}
        ok = bool(watched) and all(id(p) in watched for g in groups for p in g.get("params", ()))
        self._coverage[opt] = (sig, ok)
        return ok

    def _regrow(self) -> None:
        """Models found earlier that hold modules not seen yet (the script added a layer while
        the search was paused): they join now, under the model's names, before this step's
        gradients are read."""
        if self.scope is None:
            return
        for key, root in self.models:
            if any(self._known.get(id(m)) is not m for m in root.modules()):
                self.scope.add_model(root, key)
                self._remember(root, root)

    def _pause(self) -> None:
        handle, self._discovering = self._discovering, None
        if handle is not None:
            handle.remove()
            self.pauses += 1

    def _resume(self) -> None:
        if self._discovering is None:
            self._discovering = self._hooks.add(
                nn.modules.module.register_module_forward_pre_hook(self._discover_hook),
                "discover",
            )

    @property
    def discovering(self) -> bool:
        """Whether the search for models is on (its global hook installed)."""
        return self._discovering is not None

    # -- discovery --------------------------------------------------------------------------------
    def _consider(self, module: nn.Module) -> None:
        if (
            not torch.is_grad_enabled()
            or os.getpid() != self._pid
            or torch._C._get_tracing_state() is not None
        ):  # torch.jit.trace is not training
            return
        key = id(module)
        for cache in (self._paramless, self._frozen):
            ref = cache.get(key)
            if ref is not None and ref() is module:
                return
        self._discover(module)

    def _internal_error(self, where: str, part: str, exc: BaseException) -> None:
        """The guard switched a part of ``gradscope run`` off (the search for models, or
        closing the run at the end or on SIGTERM): say so once. A model already found stays
        watched (its own Scope's guard covers it)."""
        if self.scope is not None:
            self.scope.add_event(Event.internal_error(where, exc, part=part))
        what = (
            "stopped looking for models"
            if part == DISCOVERY
            else "could not close the run directory"
        )
        print(
            f"gradscope: internal error in {where}: {exc!r}; {what}; the script continues",
            file=sys.stderr,
            flush=True,
        )

    def _discover(self, module: nn.Module) -> None:
        root = wrapped(module)
        if self._known.get(id(root)) is root:
            self._known[id(module)] = module  # a wrapper of a model already watched
            return
        params = list(root.parameters())
        if not params:
            if len(self._paramless) >= PRUNE_AT:  # modules made per call (nn.ReLU()(x)) die
                self._paramless = {k: r for k, r in self._paramless.items() if r() is not None}
            self._paramless[id(module)] = weakref.ref(module)
            return
        if not any(p.requires_grad for p in params):
            self._frozen[id(module)] = weakref.ref(module)
            return
        own = watched_elsewhere(root, self.scope)
        if own is not None:  # the script watches it itself
            if own.run_dir not in self.deferred:
                self.deferred.append(own.run_dir)
            self._remember(module, root)
            return
        owner = next((k for k, m in self.models if any(s is root for s in m.modules())), None)
        if self.scope is None:
            try:
                scope = Scope(
                    {"": root}, [], self.config, model_label(root), launch=(self.command, self.cwd)
                )
            except ValueError as exc:  # nothing passed the filters: not ours to watch
                print(
                    f"gradscope: not watching {type(root).__name__}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                self._remember(module, root)
                return
            self.scope = scope
            key = ""
        elif owner is not None:  # new layers of a watched model
            key = self.scope.add_model(dict(self.models)[owner], owner)
        else:
            key = self.scope.add_model(root)
        if owner is None:
            self.models.append((key, root))
            self.scope.add_event(
                Event.model_found(
                    key,
                    type(root).__name__,
                    self.scope.steps,
                    parameters=sum(p.numel() for p in params),
                    trainable=sum(p.numel() for p in params if p.requires_grad),
                )
            )
        self._remember(module, root)
        self.scope.started(root)
        for opt, args, kwargs in self._stepping:
            # found inside an optimizer's step (an LBFGS closure makes the first forward):
            # that step's pre-hook fired before the Scope could hear it
            self.scope.optimizer_started(opt, args, kwargs)

    def _remember(self, module: nn.Module, root: nn.Module) -> None:
        for m in root.modules():
            self._known[id(m)] = m
        self._known[id(module)] = module

    # -- the end ----------------------------------------------------------------------------------
    def _close_hooks(self) -> None:
        self._hooks.close()
        if self._compile_original is not None and getattr(
            nn.Module.__dict__.get("compile"), "__gradscope__", False
        ):
            nn.Module.compile = self._compile_original  # type: ignore[method-assign]
            self._compile_original = None
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]

    @property
    def remembered_modules(self) -> int:
        """How many parameterless modules are remembered as not being models (the cache that
        spares the search on every forward call; pruned of dead modules as it grows)."""
        return len(self._paramless)

    def close(self, status: str, exit_code: int | None) -> Path | None:
        """Stop looking for models and close the run: the Scope's ``close()``, or, when no
        model ever trained, a run directory that says so. Returns the run directory (None if
        even that could not be written; the reason is on stderr)."""
        self._close_hooks()
        self._known.clear()
        if self.scope is not None:
            self.scope.close(status, exit_code)
            return self.scope.run_dir
        if distributed.launch_rank() != 0:  # under torchrun only rank 0 writes
            return None
        if self.deferred:  # nothing of ours: the script's own watch() has the run
            if not self.config.quiet:
                print(
                    f"gradscope: the script watches its model(s) itself: "
                    f"{', '.join(map(str, self.deferred))}",
                    file=sys.stderr,
                    flush=True,
                )
            return self.deferred[0]
        try:
            with own_imports():
                return self._write_empty(status, exit_code)
        except (OSError, ValueError) as exc:
            print(
                f"gradscope: could not write the run directory: {exc}", file=sys.stderr, flush=True
            )
            return None

    def _write_empty(self, status: str, exit_code: int | None) -> Path:
        cfg = self.config
        run_dir = rundir.create(cfg.out, cfg.name or rundir.default_name("no-model"))
        note = (
            "no model trained: no module with trainable parameters ran a forward pass with "
            "gradients enabled"
        )
        rundir.write_json(
            run_dir / rundir.RUN_JSON,
            run_meta(
                cfg,
                status,
                command=self.command,
                cwd=self.cwd,
                pid=self._pid,
                started=self._started,
                exit_code=exit_code,
                models={},
                steps=0,
                step_mode=None,
                layers=[],
                sites=[],
                note=note,
            ),
        )
        rundir.write_json(run_dir / rundir.FINDINGS, [])
        rundir.append_event(run_dir, Event.nothing_watched(note))
        if cfg.report:
            write_report_safely(run_dir, cfg.quiet)
        if not cfg.quiet:
            print(f"gradscope: {note}; run {status}: {run_dir}", file=sys.stderr, flush=True)
        return run_dir
