"""What the user hears of gradscope's own failures: one ``internal_error`` event and one line.

The :class:`~gradscope.guard.Guard` decides what an error switches off; this module says so:
an ``internal_error`` event in ``events.jsonl`` (if the store still writes) and one line on
stderr that names the part switched off and that training continues. A full disk is said even
with ``quiet``, because the run directory cannot say it. Nothing here raises. Docs:
``docs/robustness.md``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .events import Event
from .guard import ACTIVATIONS, CORE, EXIT, REMEDIES, REPORT, SAVE, STORE, TRACER, Guard

if TYPE_CHECKING:
    from .ranks import RankCoordinator

PART_NAMES = {
    ACTIVATIONS: "activation statistics",
    TRACER: "NaN/Inf tracer",
    REMEDIES: "remedies",
    REPORT: "report",
    SAVE: "hook removal in torch.save",
    "tensorboard": "TensorBoard sink",
    EXIT: "exit handler",
}
"""How a line names a part the guard switched off."""


def say(line: str) -> None:
    """One line on stderr, never an exception (a closed stderr, a broken pipe)."""
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr, flush=True)


def warn(message: str, stacklevel: int = 2) -> None:
    """A RuntimeWarning; where warnings are errors (``python -W error``, pytest) one line on
    stderr instead: a warning of gradscope's must not raise into the training loop."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    except Exception:
        say(message)


class InternalErrors:
    """Tells of the errors a Scope's guard caught.

    Args:
        guard: The Scope's guard (with several ranks, a core error is turned down to the
            activation probe and the tracer here: the other ranks wait for this one).
        run_dir: Where the records are.
        quiet: ``Config.quiet`` (a full disk is said anyway).
        step: The current step (None before the clock exists).
        record: Writes the event even after the store closed (None before the sinks exist).
        ranks: Several processes (None in one).
    """

    def __init__(
        self,
        guard: Guard,
        run_dir: Path,
        quiet: bool,
        step: Callable[[], int | None],
        ranks: RankCoordinator | None = None,
    ) -> None:
        self.guard = guard
        self.run_dir = run_dir
        self.quiet = quiet
        self.step = step
        self.ranks = ranks
        self.record: Callable[[Event], None] | None = None
        self._degraded = False

    def __call__(self, where: str, part: str, exc: BaseException) -> None:
        """The guard switched ``part`` off after ``exc`` in ``where``."""
        ranks = self.ranks
        several = ranks is not None and ranks.active
        step = self.step()
        if part == STORE and isinstance(exc, OSError):
            say(
                f"gradscope: stopped recording: cannot write the run directory "
                f"({exc.strerror or exc}: {exc.filename or self.run_dir}); training "
                f"continues unwatched; what was written before step {step or 0} is in "
                f"{self.run_dir}"
            )  # said even when quiet: the run directory cannot say it
            return
        if several and part == CORE:
            # The other ranks wait for this one in the next flush exchange: keep counting
            # steps and flushing; stop measuring what can be stopped.
            self.guard.off.discard(CORE)
            self.guard.off.update((ACTIVATIONS, TRACER))
            if self._degraded:
                return
            self._degraded = True
        if self.record is not None:
            self.record(
                Event.internal_error(
                    where, exc, part=part, step=step, rank=ranks.rank if ranks is not None else None
                )
            )
        if several and part in (CORE, ACTIVATIONS, TRACER):
            what = (
                "activation statistics and the NaN tracer are off on this rank, and it "
                "keeps taking part in the flushes (the other ranks wait for it there)"
            )
        elif part in (CORE, STORE):
            what = "gradscope stopped watching"
        elif part == EXIT:
            what = "the run directory was not closed (run.json still says running)"
        else:
            what = f"the {PART_NAMES.get(part, part)} switched off"
        rank = f" on rank {ranks.rank}" if ranks is not None else ""
        goes_on = "the program ends as it would have" if part == EXIT else "training continues"
        if not self.quiet or part == STORE:
            say(
                f"gradscope: internal error{rank} in {where}: {exc!r}; {what}; {goes_on} "
                f"(records up to the last flush are in {self.run_dir})"
            )
