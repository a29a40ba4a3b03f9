"""What the process-wide patches (:mod:`gradscope.patches`) call on a Scope.

The patches of ``backward``, the clips, ``GradScaler``, ``torch.save`` and
``destroy_process_group`` tell every open Scope's :class:`PatchListener`; each call goes to the
part it concerns, through the Scope's guard, as the entry point it is (``docs/design.md``, The
process-wide patches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.optim.optimizer as _optim_mod

from .guard import ACTIVATIONS, SAVE, Guard
from .hooks import Hook, HookSet

if TYPE_CHECKING:
    from .clock import Clock
    from .parts import Parts
    from .ranks import RankCoordinator

PATCH_ENTRIES = {  # a patch's listener call (patches._notify) -> its entry point
    "patch:before_backward": "backward",
    "patch:after_backward": "backward",
    "patch:user_clip": "clip",
    "patch:user_clipped": "clip",
    "patch:scaler_step_begin": "scaler",
    "patch:scaler_skipped": "scaler",
    "patch:torch.save": "save",
    "patch:process_group_ending": "process-group",
}


class OptimizerHooks:
    """The optimizers' step pre/post hooks, which tell the clock where optimizer steps are.

    Args:
        clock: The Scope's clock.
        guard: The Scope's guard (the hooks are its ``optimizer-pre``/``optimizer-post`` entry
            points).
    """

    def __init__(self, clock: Clock, guard: Guard) -> None:
        self.clock = clock
        self.guard = guard

    def attach(self, hooks: HookSet, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """On ``optimizers``, or (none given) on every optimizer, to find the ones that step
        the watched parameters when they first step."""
        pre = Hook(self.pre, "optimizer-pre", self.guard, "optimizer-pre")
        post = Hook(self.post, "optimizer-post", self.guard, "optimizer-post")
        if optimizers:
            for opt in optimizers:
                hooks.add(opt.register_step_pre_hook(pre), "optimizer-pre")
                hooks.add(opt.register_step_post_hook(post), "optimizer-post")
        else:
            hooks.add(_optim_mod.register_optimizer_step_pre_hook(pre), "optimizer-pre")
            hooks.add(_optim_mod.register_optimizer_step_post_hook(post), "optimizer-post")

    def pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # torch passes the step's own positional args, the optimizer itself first
        closure = any(callable(a) for a in args if a is not opt) or callable(kwargs.get("closure"))
        self.clock.optimizer_pre(opt, closure)

    def post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.clock.optimizer_post(opt)


class PatchListener:
    """One Scope's listener.

    Args:
        parts: The Scope's parts.
        ranks: Several processes (None in one).
        closed: Whether the Scope is closed.
    """

    def __init__(
        self, parts: Parts, ranks: RankCoordinator | None, closed: Callable[[], bool]
    ) -> None:
        self._parts = parts
        self._ranks = ranks
        self._closed = closed
        guard, clock, rec = parts.guard, parts.clock, parts.recorder
        self._guard = guard
        self._before = guard.wrap(clock.before_backward, "backward")
        self._after = guard.wrap(clock.after_backward, "backward")
        self._trace_after = guard.wrap(parts.tracer.after_backward, "tracer-backward")
        self._scaler_step = guard.wrap(clock.scaler_step, "scaler")
        self._scaler_skipped = guard.wrap(rec.scaler_skipped, "scaler")
        self._clip = guard.wrap(rec.user_clip, "clip")
        self._clipped = guard.wrap(rec.closure_clipped, "clip")

    def _ours(self) -> bool:
        """A backward pass concerns this scope only if one of its models ran a forward pass
        with gradients since the last step (other models' backward passes, an unwatched
        critic, are none of its business); with the activation hooks off after an error,
        nothing tells: every one counts."""
        return self._parts.recorder.modules.forward_seen or not self._guard.active(ACTIVATIONS)

    def before_backward(self, loss: torch.Tensor | None) -> None:
        if self._ours():
            self._before()

    def after_backward(self, loss: torch.Tensor | None) -> None:
        if self._ours():
            self._after(loss)
            if self._parts.tracer.armed:
                self._trace_after(loss)

    def user_clip(self, params: list[torch.Tensor], function: str, detail: dict[str, Any]) -> None:
        self._clip(params, function, detail)

    def user_clipped(self, params: list[torch.Tensor]) -> None:
        self._clipped(params)

    def scaler_step_begin(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        self._scaler_step(optimizer, getattr(scaler, "_scale", None))

    def scaler_skipped(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        self._scaler_skipped(optimizer)

    @contextlib.contextmanager
    def hooks_detached(self) -> Iterator[None]:
        """``torch.save`` is pickling: gradscope's hooks step out of the modules' hook dicts, so
        a saved model holds no trace of gradscope (it loads where gradscope is not installed)."""
        if self._closed() or not self._guard.active(SAVE):
            yield  # (hooks left in place pickle to inert no-ops: hooks.InertHook)
            return
        self._guard.fault("save")  # the patch reports it: torch.save goes on
        replay = self._parts.recorder.replay
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._parts.hooks.detached())
            stack.enter_context(self._parts.tracer.hooks.detached())
            if replay is not None:
                stack.enter_context(replay.hooks.detached())
            yield

    def process_group_ending(self) -> None:
        """``destroy_process_group()`` on every rank, before this run closes: combine what the
        ranks buffered while the group exists; what follows is each rank's own."""
        if not self._closed():
            self._guard.call("process-group", self._group_ending)

    def _group_ending(self) -> None:
        ranks = self._ranks
        if ranks is None or not ranks.active:
            return
        try:
            self._parts.flusher.flush()
        finally:
            ranks.stop("the process group was destroyed")

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A patch's call into this scope raised: switch its part off."""
        self._guard.fail(PATCH_ENTRIES.get(where, "backward"), exc)
