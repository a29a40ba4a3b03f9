"""Hook ownership: every handle gradscope registers belongs to one HookSet, removed on close.

Hooks are global state on the user's model: a handle left behind keeps running (and keeps our
objects alive) after the user thinks gradscope is gone. So each Scope owns exactly one HookSet,
registers through it, and removes everything it added, in reverse order, when it closes, also
when training raised. After ``close()`` the model has exactly the hooks it had before.

The callables we store in a module's hook dicts are :class:`Hook` objects, not closures or bound
methods: ``torch.save(model)`` and ``copy.deepcopy(model)`` pickle those dicts, and a closure
cannot be pickled while a bound method would drag the whole Scope (files, buffers) along. A Hook
pickles to an inert no-op, so a saved or copied watched model loads as a plain, unwatched one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.hooks import RemovableHandle

from .guard import ENTRY_POINTS, Deliberate, Guard


class InertHook:
    """What a gradscope hook becomes when its model is pickled or deep-copied: does nothing."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return (InertHook, ())


class Hook:
    """A picklable wrapper around one of gradscope's hook functions, run under its guard.

    Args:
        fn: The function to call; it must only measure (return None, change nothing).
        purpose: A short label (``"activation"``, ``"optimizer-pre"``) for debugging and tests.
        guard: The owner's :class:`~gradscope.guard.Guard`: an exception in ``fn`` becomes an
            internal error of ``entry``'s part (switched off) and the hook returns None, as if
            it were not there. None: unguarded (only for code that guards itself).
        entry: The entry point (a key of :data:`gradscope.guard.ENTRY_POINTS`).
    """

    __slots__ = ("entry", "fn", "guard", "part", "purpose")

    def __init__(self, fn: Callable[..., Any], purpose: str, guard: Guard | None = None,
                 entry: str = "") -> None:
        self.fn = fn
        self.purpose = purpose
        self.guard = guard
        self.entry = entry
        self.part = ENTRY_POINTS[entry] if guard is not None else ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        guard = self.guard
        if guard is None:
            return self.fn(*args, **kwargs)
        # Guard.call, inlined: this runs for every module call of the watched models
        if guard.off and not guard.active(self.part):
            return None
        try:
            if guard.faults:
                guard.fault(self.entry)
            return self.fn(*args, **kwargs)
        except Deliberate:
            raise
        except Exception as exc:
            guard.fail(self.entry, exc)
            return None

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return (InertHook, ())

    def __repr__(self) -> str:
        return f"<gradscope hook {self.purpose}>"


class HookSet:
    """The handles one Scope registered, each with its purpose; ``close()`` removes them all."""

    def __init__(self) -> None:
        self._handles: list[tuple[RemovableHandle, str]] = []

    def add(self, handle: RemovableHandle, purpose: str) -> RemovableHandle:
        """Take ownership of ``handle`` (returned for convenience)."""
        self._handles.append((handle, purpose))
        return handle

    def __len__(self) -> int:
        return len(self._handles)

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Take every hook out of its dict for the duration (``torch.save`` of a watched model
        pickles the module's hook dicts), then put each back where it was: torch keys hooks by
        ever-increasing handle ids and runs them in dict order, so sorting by id restores the
        order, the user's hooks included."""
        taken: list[tuple[dict[int, Any], int, Any]] = []  # (dict, handle id, value)
        for handle, _ in self._handles:
            dicts = (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ()))
            for ref in dicts:
                hooks = ref()
                if hooks is not None and handle.id in hooks:
                    taken.append((hooks, handle.id, hooks.pop(handle.id)))
        try:
            yield
        finally:
            touched: dict[int, dict[int, Any]] = {}
            for hooks, key, value in taken:
                hooks[key] = value
                touched[id(hooks)] = hooks
            for hooks in touched.values():
                items = sorted(hooks.items(), key=lambda kv: kv[0])
                hooks.clear()
                hooks.update(items)

    def close(self) -> None:
        """Remove every handle, newest first. Safe to call twice."""
        while self._handles:
            handle, _ = self._handles.pop()
            handle.remove()
