"""Update-to-weight ratios out of range (CS231n: about 1e-3 is healthy)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .advice import lr_now, normalisation
from .base import Episode, Records, fmt, keep_strongest, runs
from .gradients import _dead_rows, before_divergence, not_learning
from .thresholds import Thresholds

DECAYED = 0.01
"""A learning rate below this fraction of the run's largest has been decayed (by a schedule)."""


def update_ratio(rec: Records, t: Thresholds) -> list[Episode]:
    """``||Δw|| / ||w||`` of a weight matrix out of range. Biases and gains are left out: they
    start near zero, so their ratio says little about the learning rate.

    Too high: above ``update_high`` for ``patience`` checks after ``update_warmup`` steps.
    During warm-up a check counts when the ratio is above ``10 * update_high``, or when the
    median over the weight matrices, two or more, is above ``update_broad`` (the learning rate
    itself is too high, not one layer's Adam start). One check is enough when the model is
    broadly too high during warm-up, or when the run diverges (a non-finite loss or gradient)
    within ``history`` steps after it: large early updates are the cause, whatever follows.

    Too low: below ``update_low`` (and not exactly zero: frozen) for ``patience`` checks after
    warm-up, while the loss has not fallen by ``learn_progress`` since the start of the run
    (a converged run moves little, and that is fine), the learning rate is not decayed by a
    schedule (below a tenth of its peak), and no rectifier is mostly dead (dead units starve
    the layers around them: that is the ``dead_units`` finding)."""
    steps, names, r = rec.wide("update_ratio", "param")
    if not steps.size:
        return []
    weights = [j for j, n in enumerate(names) if rec.layers.ndim.get(n, 2) >= 2]
    late = steps >= t.update_warmup
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: no verdict
        # "most of the model" needs a model of several matrices: a lone linear layer growing
        # from a small init toward its targets moves by large fractions at first, and learns
        broad = (
            np.nanmedian(r[:, weights], axis=1) > t.update_broad
            if len(weights) >= 2
            else np.zeros(steps.size, dtype=bool)
        )
    high = np.where(late | broad, t.update_high, 10 * t.update_high)
    at_once = (broad & ~late) | before_divergence(rec, steps, t.history)
    scheduled, dropped = _lr_history(rec, steps)
    still = (not_learning(rec, steps, t) | dropped) & ~scheduled & ~_dead_rows(rec, steps, t)
    found: dict[str, list[tuple[float, Episode]]] = {"high": [], "low": []}
    for j in weights:
        name = names[j]
        rows = np.flatnonzero(~np.isnan(r[:, j]))
        if not rows.size:
            continue
        v = r[rows, j]
        with np.errstate(invalid="ignore"):
            hot = np.isfinite(v) & (v > high[rows])
            cold = (v > 0) & (v < t.update_low) & late[rows] & still[rows]
        spans = {
            "high": [
                (a, b)
                for a, b in runs(hot, 1)
                if b - a + 1 >= t.patience or at_once[rows[a : b + 1]].any()
            ],
            "low": runs(cold, t.patience),
        }
        for which, found_spans in spans.items():
            for a, b in found_spans:
                if steps[rows[b]] < rec.since:
                    continue
                med = float(np.median(v[a : b + 1]))
                ev: dict[str, Any] = {
                    "update_ratio": med,
                    "checks": int(b - a + 1),
                    "healthy": 1e-3,
                }
                if which == "high":
                    msg = (
                        f"updates of {name} are {fmt(med)} of its weights per step "
                        "(about 1e-3 is typical): the learning rate is too high for it"
                    )
                    hint = _high_hint(rec, med)
                    kind = "update_ratio_high"
                    cause = "lr"
                    strength = med
                elif _others_learn(r, rows[a : b + 1], j, names, rec, t):
                    msg = (
                        f"updates of {name} are only {fmt(med)} of its weights per step "
                        "while later layers move normally: the gradient that reaches it is "
                        "too small (see vanishing_gradients)"
                    )
                    hint = (
                        "fix the gradient flow rather than the learning rate: He/Xavier "
                        "init, ReLU-family hidden activations, "
                        + normalisation(rec.context, "normalisation")
                        + " or residual connections"
                    )
                    kind = "update_ratio_low"
                    cause = "gradient_flow"
                    strength = 1 / med
                else:
                    span = (int(steps[rows[a]]), int(steps[rows[b]]))
                    msg = (
                        f"updates of {name} are only {fmt(med)} of its weights per step "
                        "(about 1e-3 is typical): it barely learns"
                    )
                    cause, why, hint = _low_cause(rec, t, name, span)
                    msg += why
                    kind = "update_ratio_low"
                    strength = 1 / med
                ev["cause"] = cause
                ep = Episode(
                    kind,
                    name,
                    int(steps[rows[a]]),
                    int(steps[rows[b]]),
                    "warning",
                    ev,
                    msg,
                    hint,
                    cause=cause,
                )
                found[which].append((strength, ep))
    return keep_strongest(found["high"]) + keep_strongest(found["low"])


def _others_learn(
    r: np.ndarray, rows: np.ndarray, j: int, names: list[str], rec: Records, t: Thresholds
) -> bool:
    """Whether some weight matrix *later* in forward order moves at a normal rate (>= 100x
    ``update_low``) over the same checks: then the learning rate is not the problem."""
    for k in range(j + 1, len(names)):
        if rec.layers.ndim.get(names[k], 2) < 2:
            continue
        other = r[rows, k]
        other = other[np.isfinite(other)]
        if other.size and float(np.median(other)) >= 100 * t.update_low:
            return True
    return False


def _lr_history(rec: Records, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the ``lr`` record (where the optimizer's learning rate is known), for each row of
    ``steps``: whether a schedule brought it below a tenth of its peak so far, gradually (no
    single step divided it by more than ``LR_DROP``: cosine, linear, exponential or step
    decay), and whether it instead fell by more than ``LR_DROP`` at once (a schedule bug, a
    mistyped exponent in a group: tiny updates then need no further evidence)."""
    scheduled = np.zeros(steps.size, dtype=bool)
    dropped = np.zeros(steps.size, dtype=bool)
    s2, _, lr = rec.wide("lr", "run")
    if not s2.size:
        return scheduled, dropped
    v = np.where(np.isfinite(lr[:, 0]) & (lr[:, 0] >= 0), lr[:, 0], np.nan)
    peak = np.fmax.accumulate(np.nan_to_num(v, nan=0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        fall = np.concatenate([[1.0], v[:-1] / v[1:]])
    # the last step of a schedule that ends at exactly 0 divides by 0: a fall to 0 is abrupt
    # only from a learning rate still near its peak
    to_zero = np.concatenate([[False], (v[1:] == 0) & (v[:-1] > 0)])
    fall[to_zero] = np.where(v[np.flatnonzero(to_zero) - 1] >= 0.1 * peak[to_zero], np.inf, 1.0)
    abrupt = np.fmax.accumulate(np.nan_to_num(fall, nan=1.0)) > LR_DROP
    rows = np.searchsorted(s2, steps, side="right") - 1
    ok = rows >= 0
    low = v[rows[ok]] < 0.1 * peak[rows[ok]]
    scheduled[ok] = low & ~abrupt[rows[ok]]
    dropped[ok] = low & abrupt[rows[ok]]
    return scheduled, dropped


LR_DROP = 1000.0
"""A learning rate divided by more than this in one step fell, it was not scheduled down: step
decay divides by 10 at a time, cosine and linear schedules by far less per step."""


def _high_hint(rec: Records, ratio: float) -> str:
    """Lower the learning rate: to the value that brings the ratio to 1e-2, when it is
    known (the update ratio scales about linearly with the learning rate for SGD, and Adam)."""
    opt = rec.context.optimizer
    if opt is None or opt.lr is None or not opt.lr > 0:
        return (
            f"lower the learning rate (roughly {fmt(ratio / 1e-2)}x lower brings the ratio to "
            "1e-2), or use warm-up"
        )
    return (
        f"lower the learning rate ({opt.name} at lr {fmt(opt.lr)}: about lr "
        f"{fmt(opt.lr * 1e-2 / ratio)} brings the ratio to 1e-2), or use warm-up"
    )


def _low_cause(
    rec: Records, t: Thresholds, name: str, span: tuple[int, int]
) -> tuple[str, str, str]:
    """Why a layer barely moves when no later layer moves normally either: ``(cause, what the
    message adds, what to try)``. (Dead units and a learning rate scheduled down gradually
    raise no low-update finding at all: :func:`update_ratio`.) A learning rate that fell by
    more than ``LR_DROP`` in one step is a schedule bug; otherwise the learning rate is small."""
    steps, _, lr = rec.wide("lr", "run")
    now = lr_now(rec.context)
    if steps.size:
        v = lr[:, 0]
        in_span = v[(steps >= span[0]) & (steps <= span[1]) & np.isfinite(v)]
        seen = v[np.isfinite(v)]
        top = max(
            float(seen.max()) if seen.size else 0.0,
            max((o.initial_lr or 0.0 for o in rec.context.optimizers), default=0.0),
        )
        if in_span.size and top > 0 and float(in_span[-1]) < DECAYED * top:
            with np.errstate(divide="ignore", invalid="ignore"):
                fall = np.nan_to_num(v[:-1] / v[1:], nan=0.0, posinf=0.0)
            at = int(steps[1:][int(np.argmax(fall))]) if fall.size else span[0]
            return (
                "lr_drop",
                f": the learning rate fell to {fmt(float(in_span[-1]))} (from {fmt(top)}) "
                f"in one step, at step {at}",
                "check the scheduler or the code that sets the learning rate at that step (a "
                "step() per batch where it expects one per epoch, a mistyped exponent, a "
                "decay without a floor)",
            )
    opt = rec.context.optimizer
    if opt is not None and opt.lr is not None and opt.lr > 0:
        return (
            "lr",
            f" ({now})",
            f"raise the learning rate ({now}: try lr {fmt(opt.lr * 3)}-{fmt(opt.lr * 10)}), "
            "or its param group's if this layer has its own, and check that it should train",
        )
    return (
        "lr",
        "",
        "raise the learning rate (or its group's lr), check that the scheduler did not "
        "decay it to ~0 and that this layer should train",
    )
