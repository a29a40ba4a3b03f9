"""One guard for everything gradscope runs inside the user's program.

A monitor is uninstalled the first time it breaks a training run, so nothing gradscope does may
raise into the program it watches. Every *entry point* (a place where control passes from the
user's program, or from torch on its behalf, into gradscope) goes through a :class:`Guard`:

* module and tensor hooks (:class:`gradscope.hooks.Hook` calls its guard itself: no extra
  Python frame on the hot path), optimizer step hooks, the listeners of the process-wide
  patches (``backward``, ``clip_grad_norm_`` and co., ``torch.save``, ``GradScaler``,
  ``destroy_process_group``), the interpreter-exit and signal handlers, and each sink at flush
  and at close.

An exception inside an entry point becomes an ``internal_error`` event and one line on stderr;
the *part* of gradscope it belongs to switches off (the activation probe, the NaN tracer, one
sink, or everything that measures), and the user's call returns as if gradscope were not there.
Training goes on bit-identical to an unwatched run: with no remedy enabled gradscope never
writes to a tensor of the user's, so an error half-way through a hook leaves nothing to undo.

The only exceptions that pass are :class:`Deliberate` ones (the ``guard=`` remedy stopping a
run of non-finite steps, which the user asked for) and ``BaseException``s that are not
``Exception``s (``KeyboardInterrupt``, ``SystemExit``): those belong to the user.

Testing: ``GRADSCOPE_FAULTS=entry[,entry...]`` makes those entry points raise
:class:`InjectedFault` on every call (``tests/test_guard.py`` goes through every one of
:data:`ENTRY_POINTS` and checks the program's output, exit code and weights against an unwatched
run).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

FAULTS_ENV = "GRADSCOPE_FAULTS"

# part names
ACTIVATIONS = "activations"  # forward hooks on watched modules, output-gradient hooks
FUNCTIONAL = "functional"  # functional activations (F.relu...) inside a sampled forward
TRACER = "tracer"  # the NaN/Inf tracer's hooks
CORE = "core"  # the step clock: optimizer hooks, backward, clipping, GradScaler, flushes
SAVE = "save"  # torch.save taking gradscope's hooks out of the pickled dicts
DISCOVERY = "discovery"  # gradscope run: finding the models a script trains
STORE = "store"  # the run directory's records (Parquet, events.jsonl, run.json)
TENSORBOARD = "tensorboard"
REPORT = "report"  # report.html and the terminal summary at the end
NOTEBOOK = "notebook"  # in IPython: following the cells, the live view (not the report)
EXIT = "exit"  # interpreter exit and signal handlers closing the run
REMEDIES = "remedies"  # swap/recycle acting on findings (not an entry point of its own)

ENTRY_POINTS: dict[str, str] = {
    "module-forward": ACTIVATIONS,
    "module-forward-pre": ACTIVATIONS,
    "output-grad": ACTIVATIONS,
    "functional": FUNCTIONAL,
    "tracer-forward": TRACER,
    "tracer-grad": TRACER,
    "tracer-backward": TRACER,
    "optimizer-pre": CORE,
    "optimizer-post": CORE,
    "backward": CORE,
    "clip": CORE,
    "scaler": CORE,
    "process-group": CORE,
    "flush": CORE,
    "save": SAVE,
    "discover": DISCOVERY,
    "sink:store": STORE,
    "sink:tensorboard": TENSORBOARD,
    "report": REPORT,
    "atexit": EXIT,
    "signal": EXIT,
}
"""Every entry point, and the part of gradscope that an error in it switches off."""

MEASURING = frozenset({ACTIVATIONS, FUNCTIONAL, TRACER, CORE, SAVE})
"""Parts that measure (or serve measuring): off as soon as :data:`STOPS_MEASURING` is."""
STOPS_MEASURING = frozenset({CORE, STORE})
"""An error in the core leaves the step clock in an unknown state; the records cannot be
stored once the store fails (a full disk): either way measuring stops."""


class Deliberate(Exception):
    """Base of the exceptions gradscope raises into the program on purpose (the ``guard=``
    remedy stopping training): the only ones a :class:`Guard` lets through."""


class InjectedFault(RuntimeError):
    """Raised by an entry point named in ``GRADSCOPE_FAULTS`` (fault-injection tests)."""


def injected_faults() -> frozenset[str]:
    """The entry points ``GRADSCOPE_FAULTS`` names (unknown names are an error at once: a
    fault-injection test that injects nothing would pass for the wrong reason)."""
    raw = os.environ.get(FAULTS_ENV, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - set(ENTRY_POINTS))
    if unknown:
        raise ValueError(
            f"{FAULTS_ENV}={raw!r}: unknown entry point(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(ENTRY_POINTS)}"
        )
    return names


Reporter = Callable[[str, str, BaseException], None]


class Guard:
    """Runs gradscope's code on the user's behalf; switches a part off at its first error.

    Args:
        report: Called once per failing part with ``(entry, part, exception)``: the owner
            writes the ``internal_error`` event and the one stderr line. It must not raise
            (whatever it raises is swallowed).
    """

    __slots__ = ("_report", "errors", "faults", "off", "stops_measuring")

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self.faults = injected_faults()
        self.off: set[str] = set()  # parts switched off
        # parts whose failure stops every measuring part (several ranks: none, a rank that
        # stopped would leave the others waiting in the next flush exchange)
        self.stops_measuring: frozenset[str] = STOPS_MEASURING
        self.errors: list[tuple[str, str, str]] = []  # (entry, part, repr(exception))

    def active(self, part: str) -> bool:
        """Whether ``part`` still runs. When the core is off (or the records cannot be
        stored), nothing measures any more; the sinks, the report and the exit handlers still
        run, to write what was measured before."""
        off = self.off
        if not off:
            return True
        if part in off:
            return False
        return part not in MEASURING or not (off & self.stops_measuring)

    def stop(self) -> None:
        """Everything off (the owner closed)."""
        self.off.update(ENTRY_POINTS.values())

    def fault(self, entry: str) -> None:
        """Raise the injected fault of ``entry``, if one is injected (tests)."""
        if self.faults and entry in self.faults:
            raise InjectedFault(f"injected fault in {entry}")

    def fail(self, entry: str, exc: BaseException) -> None:
        """``entry`` raised ``exc``: switch its part off and tell the owner, once per part."""
        self._fail_part(entry, ENTRY_POINTS.get(entry, CORE), exc)

    def _tell(self, where: str, part: str, exc: BaseException) -> None:
        try:
            self._report(where, part, exc)
        except Exception:  # the reporter itself failed: one bare line, then nothing
            with contextlib.suppress(Exception):
                print(
                    f"gradscope: internal error in {where}: {exc!r}; training continues",
                    file=sys.stderr,
                    flush=True,
                )

    def isolate(
        self, part: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``fn`` under the guard, as a part of gradscope's own work (not an entry point: no
        fault is injected here, and ``part`` runs even after the core stopped). An error
        switches ``part`` off and is reported as coming from ``where``."""
        if part in self.off:
            return None
        try:
            return fn(*args, **kwargs)
        except Deliberate:
            raise
        except Exception as exc:
            self._fail_part(where, part, exc)
            return None

    def _fail_part(self, where: str, part: str, exc: BaseException) -> None:
        first = part not in self.off
        self.off.add(part)
        self.errors.append((where, part, repr(exc)))
        if first:
            self._tell(where, part, exc)

    def call(self, entry: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under the guard; None when ``entry``'s part is off or
        ``fn`` raised."""
        if not self.active(ENTRY_POINTS.get(entry, CORE)):
            return None
        try:
            if self.faults:
                self.fault(entry)
            return fn(*args, **kwargs)
        except Deliberate:
            raise
        except Exception as exc:
            self.fail(entry, exc)
            return None

    def wrap(self, fn: Callable[..., Any], entry: str) -> Callable[..., Any]:
        """``fn`` as an entry point (see :meth:`call`)."""
        if entry not in ENTRY_POINTS:
            raise KeyError(f"unknown entry point {entry!r}")

        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self.call(entry, fn, *args, **kwargs)

        guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        return guarded
