"""Update-to-weight ratios out of range (CS231n: about 1e-3 is healthy)."""

from __future__ import annotations

import numpy as np

from .base import Episode, Records, fmt, keep_strongest, runs
from .thresholds import Thresholds


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
                ev = {"update_ratio": med, "checks": int(b - a + 1), "healthy": 1e-3}
                if which == "high":
                    msg = (
                        f"updates of {name} are {fmt(med)} of its weights per step "
                        "(about 1e-3 is typical): the learning rate is too high for it"
                    )
                    hint = (
                        f"lower the learning rate (roughly {fmt(med / 1e-2)}x brings the "
                        "ratio to 1e-2), or use warm-up"
                    )
                    kind = "update_ratio_high"
                    strength = med
                elif _others_learn(r, rows[a : b + 1], j, names, rec, t):
                    msg = (
                        f"updates of {name} are only {fmt(med)} of its weights per step "
                        "while later layers move normally: the gradient that reaches it is "
                        "too small (see vanishing_gradients)"
                    )
                    hint = (
                        "fix the gradient flow rather than the learning rate: He/Xavier "
                        "init, ReLU-family hidden activations, normalisation or residual "
                        "connections"
                    )
                    kind = "update_ratio_low"
                    strength = 1 / med
                else:
                    msg = (
                        f"updates of {name} are only {fmt(med)} of its weights per step "
                        "(about 1e-3 is typical): it barely learns"
                    )
                    hint = (
                        "raise the learning rate (or its group's lr), check that the "
                        "scheduler did not decay it to ~0 and that this layer should train"
                    )
                    kind = "update_ratio_low"
                    strength = 1 / med
                ep = Episode(
                    kind, name, int(steps[rows[a]]), int(steps[rows[b]]), "warning", ev, msg, hint
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
