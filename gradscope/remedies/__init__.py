"""Remedies: what gradscope does about a pathology when asked to. All off by default.

At optimizer steps (:mod:`gradscope.remedies.steps`), right before the weights change:

* ``clip=``: gradient clipping (``norm``, ``autoclip``, ``agc``, ``zclip``;
  :mod:`gradscope.remedies.clipping`). Sync-free.
* ``guard=``: skip an optimizer step whose gradients are non-finite (weights and optimizer state
  untouched), abort after too many in a row. The one remedy that reads a flag on the host at
  every step (a device sync on accelerators; docs/costs.md, Remedies).

On findings (:mod:`gradscope.remedies.units`), when ``dead_units`` or ``saturation`` is found:

* ``swap=``: replace the activation module (:mod:`gradscope.remedies.swap`).
* ``recycle=True``: re-initialise the dead units (ReDo; :mod:`gradscope.remedies.recycle`).

Every action is an event in ``events.jsonl`` (and a TensorBoard text entry); clipping is also in
the records (``grad_norm_clipped``, ``clip_coef``, ``clip_threshold``, ``grad_norm_total_clipped``)
and a skipped step in ``skipped_step`` / ``guard_skipped``. The finding a remedy acted on lists
the action under ``remedies``. The options are parsed by :mod:`gradscope.remedies.spec`, which
needs no torch; the rest loads torch on first use. Docs: ``docs/remedies.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..guard import Deliberate
from .spec import (
    ClipSpec,
    SpecError,
    SwapRule,
    parse_clip,
    parse_guard,
    parse_recycle,
    parse_swap,
)

__all__ = [
    "ClipSpec",
    "NonfiniteStepsError",
    "SpecError",
    "StepRemedies",
    "SwapRule",
    "UnitRemedies",
    "describe",
    "parse_clip",
    "parse_guard",
    "parse_recycle",
    "parse_swap",
    "swap_activations",
]


class NonfiniteStepsError(RuntimeError, Deliberate):
    """Raised by ``guard=`` after too many optimizer steps in a row had non-finite gradients.
    The run directory, findings and report are still written. The one exception gradscope
    raises into the training loop on purpose (see :mod:`gradscope.guard`)."""


def describe(
    clip: ClipSpec | None, max_skips: int, swap: tuple[SwapRule, ...], recycle: bool
) -> dict[str, Any]:
    """The remedies switched on, as the ``remedies`` event tells them."""
    return {
        "clip": str(clip) if clip is not None else None,
        "guard": {"max_skips": max_skips} if max_skips else None,
        "swap": [str(r) for r in swap],
        "recycle": recycle,
    }


# The torch side loads on first access (PEP 562), so that parsing a remedy option
# (gradscope.Config, the command line's usage errors) does not import torch.
_TORCH_SIDE = {
    "AGC": "clipping",
    "ClipResult": "clipping",
    "Clipper": "clipping",
    "make_clipper": "clipping",
    "FUNCTIONAL_NOTE": "swap",
    "replace_module": "swap",
    "swap_activations": "swap",
    "StepRemedies": "steps",
    "UnitRemedies": "units",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
