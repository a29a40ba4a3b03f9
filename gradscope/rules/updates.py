"""Update-to-weight ratios out of range (CS231n: about 1e-3 is healthy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .advice import lr_now, normalisation
from .base import Episode, Records, fmt, keep_strongest, runs
from .thresholds import Thresholds

DECAYED = 0.01
"""A learning rate below this fraction of the run's largest has been decayed (by a schedule)."""


def update_ratio(rec: Records, t: Thresholds) -> list[Episode]:
    """``||Δw|| / ||w||`` of a weight matrix above ``update_high`` or (not exactly zero) below
    ``update_low`` for ``patience`` checks, after ``update_warmup`` steps (during warm-up only
    ratios above ``10 * update_high`` count). Biases and gains are
    left out: they start near zero, so their ratio says little about the learning rate."""
    steps, names, r = rec.wide("update_ratio", "param")
    if not steps.size:
        return []
    late = steps >= t.update_warmup
    # during warm-up only a step as large as a tenth of the weights (10x update_high) counts:
    # Adam's first steps move every coordinate by about lr, by design
    high = np.where(late, t.update_high, 10 * t.update_high)
    found: dict[str, list[tuple[float, Episode]]] = {"high": [], "low": []}
    for j, name in enumerate(names):
        if rec.layers.ndim.get(name, 2) < 2:
            continue
        rows = np.flatnonzero(~np.isnan(r[:, j]))
        if not rows.size:
            continue
        v = r[rows, j]
        for which, mask in (
            ("high", np.isfinite(v) & (v > high[rows])),
            ("low", (v > 0) & (v < t.update_low) & late[rows]),
        ):
            for a, b in runs(mask, t.patience):
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
    message adds, what to try)``. Dead units after it starve it of gradient (raising the
    learning rate would not help, and kills more units); a schedule that decayed the learning
    rate to ~0 is expected at the end of training; otherwise the learning rate is small."""
    dead = _dead_after(rec, t, name, span)
    if dead is not None:
        site, frac = dead
        return (
            "dead_units",
            f": it is starved of gradient, {fmt(100 * frac)}% of the units of {site} after it "
            "are dead (see dead_units)",
            f"revive the dead units of {site} (see the dead_units finding) rather than raising "
            "the learning rate, which kills more of them",
        )
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
            return (
                "schedule",
                f": the learning rate was decayed to {fmt(float(in_span[-1]))} (from {fmt(top)})",
                "expected at the end of a schedule that decays to ~0; earlier than that, "
                "check the scheduler (its step() once per optimizer step or per epoch, as it "
                "expects) or end the decay at a floor",
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


def _dead_after(
    rec: Records, t: Thresholds, name: str, span: tuple[int, int]
) -> tuple[str, float] | None:
    """The most dead rectifier after ``name``'s module in forward order over ``span`` (at
    least ``dead_fraction`` dead on average), or None."""
    steps, sites, dead = rec.wide("act_dead_fraction", "module")
    if not steps.size:
        return None
    module = rec.layers.module_of.get(name, name)
    rank = rec.layers.rank.get(module, rec.layers.rank.get(name))
    if rank is None:
        return None
    rows = (steps >= span[0]) & (steps <= span[1])
    if not rows.any():
        return None
    best: tuple[str, float] | None = None
    for j, site in enumerate(sites):
        if rec.layers.rank.get(site, -1) <= rank or rec.layers.family.get(site) != "rectifier":
            continue
        vals = dead[rows, j]
        vals = vals[np.isfinite(vals)]
        if vals.size and float(vals.mean()) >= t.dead_fraction:
            frac = float(vals.mean())
            if best is None or frac > best[1]:
                best = (site, frac)
    return best
