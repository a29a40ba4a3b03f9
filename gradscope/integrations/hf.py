"""Hugging Face ``transformers.Trainer``: ``Trainer(..., callbacks=[GradscopeCallback()])``.

``pip install "gradscope[hf]"``. What gradscope sees of the Trainer's loop: one step per
optimizer step (``state.global_step``; ``gradient_accumulation_steps`` accumulates backward
passes into one step). The Trainer clips with ``max_grad_norm`` (1.0 by default) between the
last backward pass and the step: gradscope records ``grad_norm`` before that clip (after AMP
unscaling: accelerate unscales first) and ``grad_norm_clipped`` after it; ``grad_norm_total``
is the pre-clip norm the Trainer logs as ``grad_norm``. Evaluation runs without gradients and is
not counted. Under torchrun every rank watches its part and rank 0 writes the run directory.

The Trainer has no callback for an exception: a run that raises is closed when the process
exits (status ``failed``), with everything up to the last flush.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..meta import RunStatus
from . import Session


def _callback_base() -> Any:
    try:
        return importlib.import_module("transformers").TrainerCallback
    except ImportError as exc:
        raise ImportError(
            'gradscope.integrations.hf needs transformers: pip install "gradscope[hf]"'
        ) from exc


class GradscopeCallback(_callback_base()):  # type: ignore[misc]
    """Watch the Trainer's model while ``trainer.train()`` runs.

    Args:
        **config: Any :func:`gradscope.watch` keyword (``out``, ``name``, ``clip``, ``swap``,
            ``activation_every``...), checked now: a bad value raises here, not mid-training.

    Attributes:
        scope: The :class:`gradscope.Scope` of the last ``train()`` (None before), for its
            ``findings`` and ``run_dir``.
    """

    def __init__(self, **config: Any) -> None:
        self._session = Session("transformers", config)

    @property
    def scope(self) -> Any:
        return self._session.scope

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if model is None:
            return
        note = (
            "gradients are read at each optimizer step: grad_norm after AMP unscaling and "
            "before the Trainer's max_grad_norm clipping, grad_norm_clipped after it"
        )
        # the optimizer the Trainer passes may be accelerate's wrapper: the one that steps the
        # parameters is found at its first step instead
        self._session.start(
            model,
            [],
            note,
            max_grad_norm=getattr(args, "max_grad_norm", None),
            gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.stop(RunStatus.COMPLETED)
