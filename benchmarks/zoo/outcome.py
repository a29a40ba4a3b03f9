"""Confirmation by outcome, in plain PyTorch (no gradscope).

For a pathological variant, train it, its *sibling* (the cause removed) and its *rescue* (the
targeted intervention). The label is confirmed when the run ends measurably worse than its
sibling and the rescue brings it back within a margin of the sibling:

- final loss: the mean loss over the last 10% of the steps (or the family's outcome window,
  e.g. the 30 steps after a poisoned batch); non-finite if any loss in the window is;
- worse: non-finite, or ``final > WORSE_REL * sibling + WORSE_ABS``;
- rescued (and cured, for a gradscope remedy): finite and
  ``final <= RESCUE_REL * sibling + RESCUE_ABS``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .families import Task

WORSE_REL, WORSE_ABS = 1.1, 0.01
RESCUE_REL, RESCUE_ABS = 1.25, 0.02


def train(task: Task) -> list[float]:
    """The plain loop every run uses (with or without gradscope around it)."""
    losses: list[float] = []
    params = [p for p in task.model.parameters() if p.requires_grad]
    for step in range(task.steps):
        task.opt.zero_grad(set_to_none=True)
        loss = task.loss(step)
        loss.backward()
        if task.clip:
            torch.nn.utils.clip_grad_norm_(params, task.clip)
        task.opt.step()
        if task.sched is not None:
            task.sched.step()
        losses.append(float(loss.detach()))
    return losses


def final_loss(task: Task, losses: list[float]) -> float:
    if task.outcome_window is not None:
        a, b = task.outcome_window
        window = losses[a:b]
    else:
        window = losses[-max(1, len(losses) // 10) :]
    if not window or not all(math.isfinite(v) for v in window):
        return math.nan
    return sum(window) / len(window)


def worse(patho: float, sibling: float) -> bool:
    if not math.isfinite(sibling):
        return False
    return not math.isfinite(patho) or patho > WORSE_REL * sibling + WORSE_ABS


def rescued(value: float, sibling: float) -> bool:
    return (
        math.isfinite(value)
        and math.isfinite(sibling)
        and value <= RESCUE_REL * sibling + RESCUE_ABS
    )


def outcome(spec: Any) -> dict[str, Any]:
    """Train the pathological run, its sibling and its rescue; ``spec`` is a RunSpec."""
    out: dict[str, Any] = {}
    for which in ("patho", "sibling", "rescue"):
        task, _ = spec.make(which)
        out[which] = final_loss(task, train(task))
    out["worse"] = worse(out["patho"], out["sibling"])
    out["rescued"] = rescued(out["rescue"], out["sibling"])
    out["confirmed"] = bool(out["worse"] and out["rescued"])
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
