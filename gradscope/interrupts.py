"""Ctrl-C (the notebook's stop button) held while gradscope writes.

A ``KeyboardInterrupt`` can land at any bytecode. Inside a flush it would leave records taken
from the step buffer but not yet diagnosed or written, and inside ``close()`` a run directory
half closed (run.json still ``running``, no report). So a flush and the end of a run hold
SIGINT and deliver it when they are done, as the handler in place would have: a flush takes
milliseconds (a model of thousands of layers: about a second), so the stop still comes at
once to a person, and what was measured is whole."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def held(deliver: bool = True) -> Iterator[None]:
    """SIGINT received inside the block is delivered when it ends: the handler that was in
    place runs then (Python's default raises ``KeyboardInterrupt`` there). Outside the main
    thread, or where SIGINT's handler is not Python's to replace, the block runs as it is.

    Args:
        deliver: False: a SIGINT inside the block is dropped (``gradscope run`` closing the
            run of a script that already ended: nothing is left to interrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(frame)

    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # installed outside Python: could not be put back
            raise ValueError
        signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError, TypeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and deliver:
            if callable(previous):
                previous(signal.SIGINT, caught[-1])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
