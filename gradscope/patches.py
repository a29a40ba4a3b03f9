"""The process-wide patches gradscope needs, installed while at least one Scope listens.

PyTorch has no hook for "backward() was called on this tensor" and none for "GradScaler skipped
this optimizer step", and both matter:

* ``torch.autograd.backward`` (which ``Tensor.backward`` calls) is where the loss is visible, and
  its return is the end of a backward pass: the step clock of loops with no optimizer.
* ``GradScaler.step`` skips ``optimizer.step()`` when the scaled gradients hold inf/NaN, so no
  optimizer hook fires on exactly the steps a user most needs to see. We wrap it to learn that a
  step was skipped (GradScaler has already synchronised to decide; we add no sync).
* ``GradScaler.scale`` is wrapped to remember the unscaled loss behind the scaled one, so the
  recorded loss is the real loss, not loss x 65536.
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``: a script that clips its own
  gradients between ``backward()`` and ``step()`` would hide an explosion from statistics read at
  the step; listeners take them just before the clip.
* ``torch.save``: a watched model pickles its hook dicts; listeners take their hooks out for the
  duration, so the file holds nothing of gradscope's.

Each patch is installed when the first listener registers and restored when the last one leaves
(only if nobody patched over us meanwhile; otherwise our wrapper stays as a pass-through). Nested
backward calls (reentrant checkpointing runs ``torch.autograd.backward`` inside backward) are not
reported: listeners see only the outermost call.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.optim.optimizer as _optim_mod

from .guard import Deliberate


class Listener(Protocol):
    """What a Scope implements to hear about backward passes and GradScaler steps."""

    def before_backward(self, loss: torch.Tensor | None) -> None: ...

    def after_backward(self, loss: torch.Tensor | None) -> None: ...

    def scaler_step_begin(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None: ...

    def scaler_skipped(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None: ...

    def user_clip(
        self, params: list[torch.Tensor], function: str, detail: dict[str, Any]
    ) -> None: ...

    def user_clipped(self, params: list[torch.Tensor]) -> None: ...

    def hooks_detached(self) -> contextlib.AbstractContextManager[None]: ...

    def process_group_ending(self) -> None: ...


class _State(threading.local):
    depth = 0  # nesting of torch.autograd.backward calls on this thread
    clipping = 0  # nesting of patched clip calls (clip_grad_norm_ calls clip_grads_with_norm_)
    scaled = False  # the current/last outermost backward started from GradScaler.scale()'s output
    scaler_calls: list[list[Any]]  # stack of [optimizer, stepped?] for GradScaler.step calls

    def __init__(self) -> None:
        self.scaler_calls = []


_listeners: list[Listener] = []
_local = _State()
_originals: dict[tuple[object, str], Callable[..., Any]] = {}
_opt_hook: Any = None
_last_scaled: tuple[weakref.ReferenceType[torch.Tensor], torch.Tensor] | None = None


def _notify(method: str, *args: Any) -> None:
    """Tell every listener, each through the guard: a listener that raises (a bug of
    gradscope's, never the user's) is told through its ``internal_error``, and the user's call
    goes on. Only an exception gradscope raises on purpose (``guard.Deliberate``: the guard
    remedy stopping training) reaches the caller."""
    for listener in tuple(_listeners):
        try:
            getattr(listener, method)(*args)
        except Deliberate:
            raise
        except Exception as exc:
            _listener_failed(listener, f"patch:{method}", exc)


def _listener_failed(listener: Any, where: str, exc: BaseException) -> None:
    report = getattr(listener, "internal_error", None)
    try:
        if report is None:
            raise exc
        report(where, exc)
    except Deliberate:
        raise
    except Exception:
        with contextlib.suppress(Exception):
            print(
                f"gradscope: internal error in {where}: {exc!r}; training continues",
                file=sys.stderr,
                flush=True,
            )


def add_listener(listener: Listener) -> Callable[[], None]:
    """Register ``listener``; returns the function that unregisters it (idempotent)."""
    if not _listeners:
        _install()
    _listeners.append(listener)

    def remove() -> None:
        if listener in _listeners:
            _listeners.remove(listener)
            if not _listeners:
                _uninstall()

    return remove


def _scalar_loss(tensors: Any) -> torch.Tensor | None:
    """The loss, when backward() was called on a single scalar tensor; else None."""
    if isinstance(tensors, (tuple, list)):
        if len(tensors) != 1:
            return None
        tensors = tensors[0]
    if not isinstance(tensors, torch.Tensor) or tensors.numel() != 1:
        return None
    if _last_scaled is not None and _last_scaled[0]() is tensors:
        return _last_scaled[1]  # the unscaled loss GradScaler.scale() was given
    return tensors.detach()


def _backward(*args: Any, **kwargs: Any) -> Any:
    original = _originals[(torch.autograd, "backward")]
    if not _listeners or _local.depth:
        _local.depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            _local.depth -= 1
    root = args[0] if args else kwargs.get("tensors")
    loss = _scalar_loss(root)
    _local.scaled = _last_scaled is not None and loss is _last_scaled[1]
    _notify("before_backward", loss)
    _local.depth += 1
    try:
        result = original(*args, **kwargs)
    finally:
        _local.depth -= 1
    _notify("after_backward", loss)
    return result


def _make_scale(cls: type) -> Callable[..., Any]:
    original = _originals[(cls, "scale")]

    def scale(self: Any, outputs: Any) -> Any:
        global _last_scaled
        result = original(self, outputs)
        scaled = isinstance(result, torch.Tensor) and result is not outputs
        if scaled and isinstance(outputs, torch.Tensor):
            _last_scaled = (weakref.ref(result), outputs.detach())
        return result

    return scale


def _make_step(cls: type) -> Callable[..., Any]:
    original = _originals[(cls, "step")]

    def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if not _listeners or not self.is_enabled():
            return original(self, optimizer, *args, **kwargs)
        _notify("scaler_step_begin", self, optimizer)
        call = [optimizer, False]
        _local.scaler_calls.append(call)
        try:
            result = original(self, optimizer, *args, **kwargs)
        finally:
            _local.scaler_calls.pop()
        if not call[1]:
            _notify("scaler_skipped", self, optimizer)
        return result

    return step


_CLIP_LIMIT = {
    "clip_grad_norm_": "max_norm",
    "clip_grads_with_norm_": "max_norm",
    "clip_grad_value_": "clip_value",
}


def _make_clip(owner: object, name: str) -> Callable[..., Any]:
    """A clip of the script's own: ``clip_grad_norm_``, ``clip_grad_value_``, or
    ``clip_grads_with_norm_`` (torch >= 2.6: the norm computed apart, with ``get_total_norm``;
    accelerate, hence the Hugging Face Trainer, clips this way). Listeners hear of the outermost
    call only: ``clip_grad_norm_`` itself clips through the same code."""
    original = _originals[(owner, name)]
    what = _CLIP_LIMIT[name]

    @functools.wraps(original)
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        if not _listeners or _local.depth or _local.clipping:
            return original(parameters, *args, **kwargs)
        passed: Any = parameters
        if isinstance(parameters, torch.Tensor):
            params = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            params = list(parameters)
            # torch warns about an empty *generator*: hand it one again
            passed = (p for p in params) if is_generator else params
        limit = args[0] if args else kwargs.get(what)
        detail: dict[str, Any] = {
            what: float(limit) if isinstance(limit, (int, float)) else repr(limit)
        }
        if name == "clip_grad_norm_":
            norm_type = args[1] if len(args) > 1 else kwargs.get("norm_type", 2.0)
            detail["norm_type"] = (
                float(norm_type) if isinstance(norm_type, (int, float)) else repr(norm_type)
            )
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        _notify("user_clip", tensors, name, detail)
        _local.clipping += 1
        try:
            result = original(passed, *args, **kwargs)
        finally:
            _local.clipping -= 1
        _notify("user_clipped", tensors)
        return result

    clip.__gradscope__ = True  # type: ignore[attr-defined]  # wraps() took torch's __module__
    return clip


def _make_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save(obj: Any, *args: Any, **kwargs: Any) -> Any:
        if not _listeners:
            return original(obj, *args, **kwargs)
        stack = contextlib.ExitStack()
        for listener in tuple(_listeners):
            try:
                stack.enter_context(listener.hooks_detached())
            except Exception as exc:  # the file then holds inert hooks (hooks.InertHook)
                _listener_failed(listener, "patch:torch.save", exc)
        try:
            return original(obj, *args, **kwargs)
        finally:
            try:
                stack.close()
            except Exception as exc:
                _listener_failed(None, "patch:torch.save", exc)

    save.__gradscope__ = True  # type: ignore[attr-defined]
    return save


def _make_destroy(original: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.distributed.destroy_process_group``: scripts call it at the end of training, on
    every rank, before a ``with watch(...)`` block or ``gradscope run`` closes the run. The
    scopes combine what the ranks buffered while the group still exists."""

    @functools.wraps(original)
    def destroy(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        if _listeners:
            dist = torch.distributed
            world = getattr(dist, "group", None)
            if group is None or group is getattr(world, "WORLD", None):
                _notify("process_group_ending")
        return original(group, *args, **kwargs)

    destroy.__gradscope__ = True  # type: ignore[attr-defined]
    return destroy


def _mark_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # Global optimizer pre-hook: an optimizer inside a GradScaler.step call really stepped.
    # (Runs inside the user's step: nothing here can raise.)
    for call in _local.scaler_calls:
        if call[0] is optimizer:
            call[1] = True


def _scaler_classes() -> list[type]:
    classes: list[type] = []
    names = ("torch.amp.grad_scaler", "torch.cuda.amp.grad_scaler", "torch.cpu.amp.grad_scaler")
    for modname in names:
        try:
            module = __import__(modname, fromlist=["GradScaler"])
        except ImportError:
            continue
        cls = getattr(module, "GradScaler", None)
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    return classes


def _install() -> None:
    global _opt_hook
    # A key still in _originals means an earlier wrapper of ours sits beneath someone else's
    # patch; it becomes active again as soon as there are listeners, so do not wrap twice.
    if (torch.autograd, "backward") not in _originals:
        _originals[(torch.autograd, "backward")] = torch.autograd.backward
        torch.autograd.backward = _backward
    if (torch, "save") not in _originals:
        _originals[(torch, "save")] = torch.save
        torch.save = _make_save(torch.save)
    import torch.nn.utils.clip_grad as clip_mod

    for owner in (clip_mod, torch.nn.utils):
        for name in _CLIP_LIMIT:
            if (owner, name) not in _originals and hasattr(owner, name):
                _originals[(owner, name)] = getattr(owner, name)
                setattr(owner, name, _make_clip(owner, name))
    if torch.distributed.is_available():
        import torch.distributed.distributed_c10d as c10d

        for owner in (c10d, torch.distributed):
            name = "destroy_process_group"
            if (owner, name) not in _originals and hasattr(owner, name):
                _originals[(owner, name)] = getattr(owner, name)
                setattr(owner, name, _make_destroy(getattr(owner, name)))
    for cls in _scaler_classes():
        for name, make in (("step", _make_step), ("scale", _make_scale)):
            if name in cls.__dict__ and (cls, name) not in _originals:
                # patch where the method is defined, not where it is inherited
                _originals[(cls, name)] = cls.__dict__[name]
                setattr(cls, name, make(cls))
    _opt_hook = _optim_mod.register_optimizer_step_pre_hook(_mark_stepped)


def _uninstall() -> None:
    global _opt_hook, _last_scaled
    if _opt_hook is not None:
        _opt_hook.remove()
        _opt_hook = None
    for (owner, name), original in list(_originals.items()):
        current = getattr(owner, "__dict__", {}).get(name, getattr(owner, name, None))
        if getattr(current, "__module__", None) == __name__ or getattr(
            current, "__gradscope__", False
        ):
            setattr(owner, name, original)
            del _originals[(owner, name)]
        # else: someone patched over us; our wrapper stays beneath theirs as a pass-through
    _last_scaled = None


def installed() -> bool:
    """Whether the patches are in place (for tests)."""
    return torch.autograd.backward is _backward


def backward_was_scaled() -> bool:
    """Whether the last outermost backward pass on this thread started from a GradScaler-scaled
    loss: gradients read at its end are still multiplied by the scale."""
    return _local.scaled


def in_scaler_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` is running inside ``GradScaler.step`` on this thread (the
    scaler has already checked the gradients and skips non-finite steps itself)."""
    return any(call[0] is optimizer for call in _local.scaler_calls)
