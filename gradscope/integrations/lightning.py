"""Lightning: ``Trainer(callbacks=[GradscopeCallback(...)])``.

Works with ``lightning`` (``lightning.pytorch``) and with the older ``pytorch_lightning``
package, whichever is installed (``pip install "gradscope[lightning]"``).

What gradscope sees of Lightning's loop: one step per optimizer step (``trainer.global_step``;
``accumulate_grad_batches`` accumulates backward passes into one step). The gradients are read
after the backward pass of the step's closure, which is after AMP unscaling (``16-mixed``) and
before Lightning's ``gradient_clip_val`` clipping, so ``grad_norm`` shows what the clip acted on
and ``grad_norm_clipped`` what it left.
Validation and test loops run without gradients and are not counted. The remedies' state (clip
histories) is saved in Lightning's checkpoints with the callback's state and restored on resume.
Under a DDP/FSDP strategy every rank watches its part and rank 0 writes the run directory.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..meta import RunStatus
from . import Session, status_of


def _callback_base() -> Any:
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(package).Callback
        except ImportError:
            continue
    raise ImportError(
        'gradscope.integrations.lightning needs Lightning: pip install "gradscope[lightning]"'
    )


class GradscopeCallback(_callback_base()):  # type: ignore[misc]
    """Watch the LightningModule while ``trainer.fit`` runs.

    Args:
        **config: Any :func:`gradscope.watch` keyword (``out``, ``name``, ``clip``, ``swap``,
            ``activation_every``...), checked now: a bad value raises here, not mid-fit.

    Attributes:
        scope: The open :class:`gradscope.Scope` during ``fit`` (None before), for its
            ``findings`` and ``run_dir``; still readable after ``fit``.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._session = Session("lightning", config)

    @property
    def scope(self) -> Any:
        return self._session.scope

    @property
    def state_key(self) -> str:
        return "GradscopeCallback"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        clip = getattr(trainer, "gradient_clip_val", None)
        note = (
            "gradients are read after the backward pass of each optimizer step: after AMP "
            "unscaling, before Lightning's gradient clipping (grad_norm); grad_norm_clipped "
            "after it"
        )
        self._session.start(
            pl_module,
            list(trainer.optimizers),
            note,
            gradient_clip_val=clip,
            gradient_clip_algorithm=getattr(trainer, "gradient_clip_algorithm", None)
            if clip
            else None,
            accumulate_grad_batches=getattr(trainer, "accumulate_grad_batches", 1),
            precision=str(getattr(trainer, "precision", "")),
        )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.stop(RunStatus.COMPLETED)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.stop(status_of(exception))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._session.stop(RunStatus.COMPLETED)

    def state_dict(self) -> dict[str, Any]:
        return self._session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._session.load_state_dict(state_dict)
