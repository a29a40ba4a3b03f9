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
from collections.abc import Callable, Iterable, Iterator
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

    def __init__(
        self, fn: Callable[..., Any], purpose: str, guard: Guard | None = None, entry: str = ""
    ) -> None:
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
        pickles the module's hook dicts), then put each back where it was.

        The order of a hook dict is the order torch runs the hooks in, and it is not the order
        of the handle ids: ``register_forward_hook(prepend=True)`` (and the other ``prepend``
        registrations) move a new hook to the front. So each dict we take from has its full key
        order recorded first (the ``*_with_kwargs`` and ``*_always_called`` dicts that a handle
        also keys are dicts we take from too), and is rebuilt in that order afterwards. A hook
        registered while ours were out keeps its place relative to the hooks that stayed: after
        ours when it was appended, first when it was prepended."""
        touched = take_out(handle for handle, _ in self._handles)
        try:
            yield
        finally:
            put_back(touched)

    def close(self) -> None:
        """Remove every handle, newest first. Safe to call twice."""
        while self._handles:
            handle, _ = self._handles.pop()
            handle.remove()


Taken = dict[int, tuple[dict[int, Any], list[int], dict[int, Any]]]
"""Hooks out of their dicts: id(dict) -> (the dict, its keys before anything was taken,
{handle id: the hook taken})."""


def take_out(handles: Iterable[RemovableHandle]) -> Taken:
    """Take the hooks of ``handles`` out of every dict that holds them (a forward hook's
    ``*_with_kwargs``/``*_always_called`` entries too), recording each dict's order first;
    :func:`put_back` restores them. A handle whose hook is not in its dict (removed, or taken
    already) is skipped."""
    touched: Taken = {}
    for handle in handles:
        hid = handle.id
        refs = getattr(handle, "extra_dict_ref", ())
        for ref in (handle.hooks_dict_ref, *refs) if refs else (handle.hooks_dict_ref,):
            hooks = ref()
            if hooks is None or hid not in hooks:
                continue
            entry = touched.get(id(hooks))
            if entry is None:
                entry = touched[id(hooks)] = (hooks, list(hooks), {})
            entry[2][hid] = hooks.pop(hid)
    return touched


def put_back(touched: Taken) -> None:
    """Put what :func:`take_out` took back where it was (see :func:`_put_back`)."""
    for hooks, order, taken in touched.values():
        if not hooks and len(taken) == len(order):  # the usual case: only ours were there
            hooks.update((key, taken[key]) for key in order)
        else:
            _put_back(hooks, order, taken)


def _put_back(hooks: dict[int, Any], order: list[int], taken: dict[int, Any]) -> None:
    """Re-insert ``taken`` into ``hooks`` (in place: handles hold weak references to the dict)
    at the places they had in ``order``, the dict's keys before they were taken.

    Each taken hook goes back right before the first hook that followed it in ``order`` and is
    still there. A key that is not in ``order`` (registered meanwhile) stays where it is among
    the hooks that stayed. torch appends a new hook or prepends it, so a new key before every
    hook that stayed was prepended: it stays first. Any other new key was appended: the taken
    hooks that were before the next hook that stayed (all of them when none follows) go first.
    (With no hook of the user's left to compare with, a new key counts as appended.)
    """
    pos = {key: i for i, key in enumerate(order)}
    now = list(hooks.items())
    # for each key now held: taken hooks from an old position below this go before it
    bound = [len(order)] * len(now)
    nxt = len(order)
    for i in range(len(now) - 1, -1, -1):
        nxt = pos.get(now[i][0], nxt)
        bound[i] = nxt
    for i, (key, _) in enumerate(now):
        if key in pos:
            bound[:i] = [0] * i  # new keys ahead of every old one that stayed: prepended
            break
    pending = [key for key in order if key in taken]  # in their old order
    merged: list[tuple[int, Any]] = []
    j = 0
    for (key, value), limit in zip(now, bound):
        while j < len(pending) and pos[pending[j]] < limit:
            merged.append((pending[j], taken[pending[j]]))
            j += 1
        merged.append((key, value))
    merged.extend((key, taken[key]) for key in pending[j:])
    hooks.clear()
    hooks.update(merged)
