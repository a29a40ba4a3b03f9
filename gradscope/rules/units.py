"""Dead rectifier units and saturated sigmoid/tanh units."""

from __future__ import annotations

from typing import Any

import numpy as np

from .advice import lower_lr, normalisation
from .base import Episode, Records, fmt, runs
from .thresholds import Thresholds

_RECTIFYING = ("rectifier", "other")
_SOFT = (
    "LeakyReLU",
    "PReLU",
    "RReLU",
    "ELU",
    "CELU",
    "SELU",
    "GELU",
    "SiLU",
    "Mish",
    "Hardswish",
)  # never exactly flat below 0: a "dead" unit still passes some gradient
_BOUNDED = ("sigmoid", "tanh")  # softmax attention is peaked by design: not a pathology


def dead_units(rec: Records, t: Thresholds) -> list[Episode]:
    """At least ``dead_fraction`` of a rectifier's units output nothing for every example, for
    ``patience`` checks. Born dead (already at the first check of the run) is told apart from
    died in training."""
    steps, sites, dead = rec.wide("act_dead_fraction", "module")
    if not steps.size:
        return []
    n = rec.aligned("_n", "module", steps, sites)
    units = rec.aligned("_units", "module", steps, sites)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = n / units
    out: list[Episode] = []
    ctx = rec.context
    for j, site in enumerate(sites):
        if rec.layers.family.get(site) not in _RECTIFYING:
            continue
        rows = np.flatnonzero(~np.isnan(dead[:, j]))
        swap = ctx.swapped.get(site.split("#", 1)[0])
        if swap is not None:  # the module there now is the swap's: judge it on its own steps
            rows = rows[steps[rows] > swap[0]]
        if not rows.size:
            continue
        frac = dead[rows, j]
        enough = ~(samples[rows, j] < t.dead_min_samples)  # unknown counts: trust the fraction
        # a non-finite fraction is a NaN activation (stored as inf), not dead units: that is the
        # nonfinite finding (it once raised dead_units on every NaN run of the corpus)
        mask = np.isfinite(frac) & (frac >= t.dead_fraction) & enough
        for a, b in runs(mask, t.patience):
            if steps[rows[b]] < rec.since:
                continue
            first_step, last_step = int(steps[rows[a]]), int(steps[rows[b]])
            start = rec.first_seen.get((site, "module", "act_dead_fraction"))
            born = start is not None and start[1] >= t.dead_fraction and first_step <= start[0]
            latest = float(frac[b])
            kind_of = rec.layers.module_type.get(site, "activation")
            # a functional call (F.relu after conv1) has no module: swap= cannot replace it
            called = rec.layers.functional.get(site)
            what_of = called or kind_of
            ev: dict[str, Any] = {
                "dead_fraction": latest,
                "peak_dead_fraction": float(frac[a : b + 1].max()),
                "units": None if np.isnan(units[rows[b], j]) else int(units[rows[b], j]),
                "born_dead": bool(born),
                "since_step": first_step,
                "at_first_check": None if start is None else start[1],
            }
            # a hard rectifier passes nothing below 0; LeakyReLU, ELU, GELU, SiLU... still pass
            # a small gradient where they are never positive
            hard = kind_of not in _SOFT
            if not hard:
                what = (
                    "they are never positive on any example, where a "
                    f"{kind_of} passes only a small gradient"
                )
                msg = f"{fmt(100 * latest)}% of the units of {site} ({what_of}) " + (
                    f"are dead from the start: {what}"
                    if born
                    else f"died during training (since step {first_step}): {what}"
                )
                hint = (
                    lower_lr(ctx) + ", or re-initialise the layer before it "
                    "(He/Kaiming init, a small positive bias); these units learn slowly "
                    "rather than not at all"
                )
            elif born:
                msg = (
                    f"{fmt(100 * latest)}% of the units of {site} ({what_of}) are dead from "
                    "the start: they output 0 for every example, so no gradient reaches the "
                    "layers below through them"
                )
                hint = (
                    "re-initialise: He/Kaiming init (nn.init.kaiming_normal_) and a "
                    "small positive bias; a deep narrow ReLU net dies at init with high "
                    "probability (Lu et al. 2019): widen it or make it shallower; or "
                    + _leaky(site, called, kind_of)
                )
            if hard and not born:
                msg = (
                    f"{fmt(100 * latest)}% of the units of {site} ({what_of}) died during "
                    f"training (since step {first_step}): they output 0 for every example"
                )
                hint = (
                    f"{lower_lr(ctx)}: a large step pushes pre-activations below 0 for every "
                    f"input, for good; "
                    f"{_leaky(site, called, kind_of, ' so dead units get a gradient again')}"
                )
            sev = "error" if latest >= 0.9 and hard else "warning"
            cause = ("born" if born else "died") + ("" if hard else "_soft")
            if swap is not None:
                # what the swap leaves: units a LeakyReLU (or the like) keeps below 0 on every
                # example still learn through its small slope
                ev["after_swap"] = {"step": swap[0], "from": swap[1], "to": swap[2]}
                msg = (
                    f"{fmt(100 * latest)}% of the units of {site} are never positive since "
                    f"the swap at step {swap[0]} ({swap[1]} -> {swap[2]}): this follows from "
                    f"the swap; {swap[2]} passes them a small gradient, so they can recover"
                )
                hint = (
                    "nothing to do while the loss improves; if they stay inactive, "
                    + lower_lr(ctx)
                    + " or re-initialise the layer before it"
                )
                sev, cause = "info", "after_swap"
            out.append(
                Episode("dead_units", site, first_step, last_step, sev, ev, msg, hint, cause=cause)
            )
    return _fold_cascades(out, rec)


def _leaky(site: str, called: str | None, module_type: str, why: str = "") -> str:
    """The LeakyReLU advice (``why``: what it brings), as a change to the model's code: the
    ``swap=`` remedy is not suggested (swapped in once units are dead, it cured 5 of 32 of the
    corpus' dead-unit runs: :data:`~gradscope.rules.advice.SUGGESTED_OPTIONS`)."""
    if called:
        fn = called.split(" ")[0]
        return f"call F.leaky_relu(x, 0.01) instead of {fn}(x) in forward(){why}"
    return f"build {site} as nn.LeakyReLU(0.01) instead of nn.{module_type}{why}"


def _fold_cascades(episodes: list[Episode], rec: Records) -> list[Episode]:
    """A layer whose units are *all* dead feeds constants to everything after it, so the
    rectifiers downstream die with it: one finding at the first fully dead layer (in forward
    order), naming the others, instead of one per layer."""
    big = len(rec.layers.rank) + 1
    episodes = sorted(episodes, key=lambda e: rec.layers.rank.get(e.layer, big))
    kept: list[Episode] = []
    for ep in episodes:
        head = next(
            (
                k
                for k in kept
                if k.evidence["peak_dead_fraction"] >= 1.0
                and ep.first_step <= k.last_step
                and k.first_step <= ep.last_step
            ),
            None,
        )
        if head is None:
            kept.append(ep)
        else:
            also = head.evidence.setdefault("downstream_dead", [])
            if len(also) < 20:
                also.append(ep.layer)
            head.layers.append(ep.layer)
    return kept


def saturation(rec: Records, t: Thresholds) -> list[Episode]:
    """At least ``saturation_fraction`` of a hidden sigmoid/tanh's outputs pinned at the limits,
    for ``patience`` checks (their local derivative is near 0: the gradient stops there). An
    activation after the last layer with parameters is the model's output: a confident
    classifier's sigmoid is pinned at 0/1 by design, so it is left out."""
    steps, sites, sat = rec.wide("act_saturation", "module")
    out: list[Episode] = []
    owners = {rec.layers.module_of[p] for p in rec.layers.module_of}
    last_layer = max((rec.layers.rank.get(m, -1) for m in owners), default=None)
    for j, site in enumerate(sites):
        family = rec.layers.family.get(site)
        if family not in _BOUNDED:
            continue
        if last_layer is not None and rec.layers.rank.get(site, -1) > last_layer:
            continue  # an output activation: a confident prediction is pinned by design
        rows = np.flatnonzero(~np.isnan(sat[:, j]))
        mask = np.isfinite(sat[rows, j]) & (sat[rows, j] >= t.saturation_fraction)
        for a, b in runs(mask, t.patience):
            if steps[rows[b]] < rec.since:
                continue
            latest = float(sat[rows[b], j])
            kind_of = rec.layers.module_type.get(site, family)
            called = rec.layers.functional.get(site)
            ev = {
                "saturated_fraction": latest,
                "peak_saturated_fraction": float(sat[rows[a : b + 1], j].max()),
                "family": family,
            }
            msg = (
                f"{fmt(100 * latest)}% of the outputs of {site} ({called or kind_of}) are "
                "pinned at their limits, where the derivative is near 0"
            )
            relu = (
                # a code change: swap= to ReLU cured none of the corpus' saturated runs
                f"(call F.relu instead of {called.split(' ')[0]} in forward())"
                if called
                else f"(nn.ReLU instead of nn.{kind_of} for {site})"
            )
            ctx = rec.context
            norm = (
                "normalise the inputs or add a LayerNorm before it"
                if not ctx.has_norm
                else "normalise the inputs; " + normalisation(ctx)
            )
            hint = (
                "initialise the layer before it with Xavier (nn.init.xavier_uniform_) so "
                f"pre-activations stay small (Glorot & Bengio 2010); {norm}; or use ReLU in "
                f"hidden layers {relu}"
            )
            out.append(
                Episode(
                    "saturation",
                    site,
                    int(steps[rows[a]]),
                    int(steps[rows[b]]),
                    "warning",
                    ev,
                    msg,
                    hint,
                    cause=family,
                )
            )
    return out
