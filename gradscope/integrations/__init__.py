"""Callbacks for training frameworks: one line in the framework's own callback list.

* :mod:`gradscope.integrations.lightning`: ``GradscopeCallback`` for Lightning's ``Trainer``
  (``pip install "gradscope[lightning]"``);
* :mod:`gradscope.integrations.hf`: ``GradscopeCallback`` for Hugging Face's ``Trainer``
  (``pip install "gradscope[hf]"``).

Both take any :func:`gradscope.watch` keyword (the same :class:`~gradscope.Config`, checked
when the callback is made) and write the same run directory. Steps are the framework's optimizer
steps: gradient accumulation, AMP and gradient clipping are done by the framework, and gradscope
reads the gradients as the framework produces them: after unscaling, and before the framework's
own clipping (``grad_norm``; ``grad_norm_clipped`` after it where the clip is taken between the
backward pass and the step). The run says so in a ``framework`` event.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..events import Event
from ..meta import RunStatus, status_for


class Session:
    """One watched training run of a framework: made when training begins, closed when it ends
    (also when it raises). The framework callbacks are thin adapters of this."""

    def __init__(self, framework: str, config: dict[str, Any]) -> None:
        from .. import resolve_config

        resolve_config(**config)  # a bad option fails here, when the callback is made
        self.framework = framework
        self.config = dict(config)
        self.scope: Any = None
        self._state: dict[str, Any] | None = None  # remedies' state from a checkpoint
        self._last: dict[str, Any] = {}  # the state when the last watched run ended

    @property
    def open(self) -> bool:
        return self.scope is not None and not self.scope.closed

    def start(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        note: str,
        **detail: Any,
    ) -> None:
        """Watch ``model`` (and ``optimizers``; found at their first step when empty)."""
        import gradscope

        if self.open:
            return
        # called by the framework inside the user's training: nothing here may raise into it
        try:
            self.scope = gradscope.watch(model, list(optimizers) or None, **self.config)
        except Exception as exc:
            self.scope = None
            print(
                f"gradscope: not watching this {self.framework} run: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return
        self.scope.add_event(Event.framework(self.framework, note, **detail))
        if self._state is not None:
            state, self._state = self._state, None
            try:
                self.scope.load_state_dict(state)
            except (TypeError, ValueError) as exc:  # a checkpoint of another configuration
                print(f"gradscope: the remedies start afresh: {exc}", file=sys.stderr, flush=True)

    def stop(self, status: str = RunStatus.COMPLETED) -> None:
        if self.open:
            self._state = None
            try:  # kept: a framework may checkpoint after training ends
                self._last = dict(self.scope.state_dict())
            finally:
                self.scope.close(status)

    def state_dict(self) -> dict[str, Any]:
        """The remedies' state, for the framework's checkpoints."""
        if self.open:
            return dict(self.scope.state_dict())
        return dict(self._state or self._last)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore it when the watched run starts (frameworks restore callbacks first)."""
        if not state:
            return
        if self.open:
            self.scope.load_state_dict(state)
        else:
            self._state = dict(state)


def status_of(exc: BaseException | None) -> str:
    """The run's status when the framework ended with ``exc`` (:func:`gradscope.meta.status_for`,
    the one mapping every entry point uses)."""
    return str(status_for(exc))


__all__ = ["Session", "status_of"]
