"""Exploding and vanishing gradients.

Two views, because each is blind where the other sees (docs/findings.md,
"exploding_gradients"):

* **over time**: a parameter's gradient norm against its own trailing history (median and MAD of
  log-norms, so one spike or one NaN step does not move the baseline);
* **over depth**: the backward signal, the norm of the gradient with respect to each module's
  output, in forward order, summarised by a log-linear fit (robust to one odd layer). Scaling
  every weight of a ReLU net by g multiplies the backward signal by g per layer but leaves the
  ratio of first to last *weight*-gradient norms unchanged (Glorot & Bengio 2010, eq. 14;
  measured), so depth-wise explosion shows only here. Weight gradients relative to their
  weights are the fallback where the backward signal is missing (torch.compile).

Units that are dead also stop gradients; that is reported as ``dead_units``, not as vanishing
(torch-surgeon calls dead ReLUs "vanishing"; docs/comparison.md, "Other monitors").
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..records import RUN_LAYER
from .advice import clip_in_code, lower_lr, normalisation, setting
from .base import Episode, Records, fmt, keep_strongest, runs, trailing_stats
from .thresholds import Thresholds

EARLY_HISTORY = 5
"""Observations before a single 100x jump can be judged. Measured: over the first 25 steps of 14
healthy runs no norm exceeded 5x the median of the steps before it (from 5 on)."""
SETBACK_STEPS = 10
"""Steps on each side of a gradient spike whose losses tell whether it set training back."""
_MAD_FLOOR = 0.01  # log10 units: a history that never varies still has 2% noise
_Z = 1.4826  # MAD -> standard deviation for normal data


def _clip_hint(rec: Records, before: int) -> str:
    """Clipping advice for an explosion that starts at step ``before``: in code, with a bound
    from the healthy steps before it (:func:`~gradscope.rules.advice.clip_in_code`)."""
    return clip_in_code(rec.context, healthy_norm(rec, before))


HEALTHY_MIN = 5
"""Finite total norms before an episode needed to call their median the healthy norm."""


def healthy_norm(rec: Records, before: int) -> float | None:
    """The median total gradient norm over the window's steps before ``before`` (the run
    before the episode began), or None with fewer than :data:`HEALTHY_MIN` of them."""
    steps, _, total = rec.wide("grad_norm_total", "run")
    if not steps.size:
        return None
    v = total[steps < before, 0]
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size >= HEALTHY_MIN else None


def _clipped(rec: Records, first: int, last: int, peak: int | None) -> dict[str, Any]:
    """Evidence of a clip in force over steps ``first``-``last``: the option, the step it acts
    from, the total norm after clipping at ``peak`` and its largest over the episode (empty
    when no clip acted by ``last``)."""
    ctx = rec.context
    if ctx.clip is None or ctx.clip_from is None or ctx.clip_from > last:
        return {}
    steps, _, post = rec.wide("grad_norm_total_clipped", "run")
    ev: dict[str, Any] = {"clip": ctx.clip, "clipped_since": ctx.clip_from}
    if steps.size:
        sel = (steps >= first) & (steps <= last)
        vals = post[sel, 0]
        vals = vals[np.isfinite(vals)]
        if vals.size:
            ev["post_clip_norm_max"] = float(vals.max())
        at = np.flatnonzero(steps == (last if peak is None else peak))
        if at.size and np.isfinite(post[at[0], 0]):
            ev["post_clip_norm"] = float(post[at[0], 0])
    return ev


def _clip_note(rec: Records, ev: dict[str, Any], step: int | None) -> str:
    """The sentence a clipped episode's message ends with."""
    if not ev:
        return ""
    note = (
        f"; the gradients are clipped ({setting('clip', rec.context.clip or '')}) since step "
        f"{ev['clipped_since']}"
    )
    if "post_clip_norm" in ev and step is not None:
        note += f": after clipping, the total norm was {fmt(ev['post_clip_norm'])} at step {step}"
    return note


def _lower_lr_hint(rec: Records) -> str:
    return lower_lr(rec.context)


def exploding_gradients(rec: Records, t: Thresholds) -> list[Episode]:
    """A parameter's gradient norm far above its own history (``spike_ratio`` x the median and
    a robust z of ``spike_z``) on ``patience`` steps, each within ``history`` steps of the
    previous, or ``spike_once_ratio`` x once; a norm that overflowed although every element
    is finite; growth of the backward signal with depth; before any history exists, a weight
    matrix's gradient ``grad_weight_ratio`` x its own norm."""
    out = _temporal(rec, t) + _overflow(rec) + _relative(rec, t)
    out += [e for e in _depth(rec, t) if e.kind == "exploding_gradients"]
    return out


def vanishing_gradients(rec: Records, t: Thresholds) -> list[Episode]:
    """The backward signal (or weight gradients relative to weights) collapsing from the last
    layers to the first."""
    return [e for e in _depth(rec, t) if e.kind == "vanishing_gradients"]


def _temporal(rec: Records, t: Thresholds) -> list[Episode]:
    steps, names, norms = rec.wide("grad_norm", "param")
    if not steps.size:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.where(norms > 0, np.log10(norms), np.nan)  # zeros: dead or unused, no history
    logn[np.isnan(norms)] = np.nan
    # context for runs that cross `since`, and for a spike whose aftermath had not been seen
    need = steps >= rec.since - max(t.patience * 2, SETBACK_STEPS)
    # a 100x jump is judged from EARLY_HISTORY observations on (a run can blow up before it
    # has min_history steps); clusters of 10x spikes wait for the full min_history
    med, mad, _ = trailing_stats(logn, t.history, min(EARLY_HISTORY, t.min_history), need)
    seen = np.isfinite(logn)
    early = np.cumsum(seen, axis=0) - seen < t.min_history  # finite observations before
    with np.errstate(invalid="ignore"):
        excess = logn - med
        z = excess / np.maximum(_Z * mad, _MAD_FLOOR)
        finite = np.isfinite(logn)
        hot = finite & (excess >= np.log10(t.spike_ratio)) & (z >= t.spike_z)
        once = hot & (excess >= np.log10(t.spike_once_ratio))
        hot &= ~early
        # one spike that sets the loss back is a finding without patience (a recurrent net's
        # 16x spike that undoes training); one that leaves the loss alone is noise
        lone = hot & _loss_setback(rec, steps, hot.any(axis=1), t)[:, None]
        # a single spiking step whose loss jumped with it is one bad batch: the loss_spike
        # finding (its gradients spike because its loss does); gradients explode when spikes
        # recur or set training back
        bad_batch = _loss_jumped(rec, steps, (once | lone).any(axis=1), t)
        once &= ~bad_batch[:, None]
        lone &= ~bad_batch[:, None]
        # a spike is an explosion only where the gradient is now large for this model, not
        # merely large for its own tiny past (a first layer waking from a vanishing plateau)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            typical = np.nanmedian(med, axis=1)  # the model's usual (log) gradient norm
        small = logn < typical[:, None]
        hot &= ~small
        once &= ~small
        lone &= ~small
    candidates: list[tuple[float, Episode]] = []
    for j, name in enumerate(names):
        col_rows = np.flatnonzero(~np.isnan(norms[:, j]))
        if not col_rows.size:
            continue
        spans = _clusters(steps[col_rows], hot[col_rows, j], t.patience, t.history)
        spans += [(int(i), int(i)) for i in np.flatnonzero((once | lone)[col_rows, j])]
        for a, b in spans:
            rows = col_rows[a : b + 1]
            rows = rows[hot[rows, j] | once[rows, j]]  # the spiking steps of the cluster
            if steps[rows[-1]] < rec.since - (SETBACK_STEPS if lone[rows[-1], j] else 0):
                continue
            peak_row = rows[np.argmax(excess[rows, j])]
            ratio = 10 ** float(excess[peak_row, j])
            base = 10 ** float(med[peak_row, j])
            peak = float(norms[peak_row, j])
            ev = {
                "peak_norm": peak,
                "median_norm": base,
                "peak_ratio": ratio,
                "robust_z": float(z[peak_row, j]),
                "peak_step": int(steps[peak_row]),
                "history": t.history,
                "steps": int(rows.size),
            }
            sustained = (
                "once"
                if rows.size == 1
                else f"{rows.size} spikes over steps {int(steps[rows[0]])}-{int(steps[rows[-1]])}"
            )
            msg = (
                f"gradient norm of {name} reached {fmt(peak)} at step {int(steps[peak_row])}, "
                f"{fmt(ratio)}x its median of {fmt(base)} ({sustained})"
            )
            sev = "error" if ratio >= t.spike_once_ratio else "warning"
            first_step, last_step = int(steps[rows[0]]), int(steps[rows[-1]])
            clip_ev = _clipped(rec, first_step, last_step, int(steps[peak_row]))
            ev.update(clip_ev)
            ep = Episode(
                "exploding_gradients",
                name,
                first_step,
                last_step,
                sev,
                ev,
                msg + _clip_note(rec, clip_ev, int(steps[peak_row])),
                _clip_hint(rec, first_step) + "; or " + _lower_lr_hint(rec),
                cause="spike",
            )
            candidates.append((ratio, ep))
    return keep_strongest(candidates)


def _loss_jumped(rec: Records, steps: np.ndarray, rows: np.ndarray, t: Thresholds) -> np.ndarray:
    """Rows (of those marked) whose loss is at least ``loss_spike_ratio`` x the median of the
    ``history`` losses before it."""
    out = np.zeros(steps.size, dtype=bool)
    s2, _, loss = rec.wide("loss", "run")
    if not s2.size or not rows.any():
        return out
    v = loss[:, 0]
    for i in np.flatnonzero(rows).tolist():
        at = int(np.searchsorted(s2, steps[i]))
        if at >= s2.size or s2[at] != steps[i] or not np.isfinite(v[at]):
            continue
        before = v[max(0, at - t.history) : at]
        before = before[np.isfinite(before)]
        if before.size >= EARLY_HISTORY:
            out[i] = bool(v[at] >= t.loss_spike_ratio * float(np.median(before)) > 0)
    return out


def _loss_setback(rec: Records, steps: np.ndarray, rows: np.ndarray, t: Thresholds) -> np.ndarray:
    """Rows (of those marked in ``rows``) after which the loss's median over the next
    ``SETBACK_STEPS`` steps is at least ``loss_setback`` times its median over the previous
    ones (or not finite): the step undid training."""
    out = np.zeros(steps.size, dtype=bool)
    s2, _, loss = rec.wide("loss", "run")
    if not s2.size or not rows.any():
        return out
    v = loss[:, 0]
    for i in np.flatnonzero(rows).tolist():
        step = int(steps[i])
        lo, mid, hi = np.searchsorted(s2, [step - SETBACK_STEPS, step, step + SETBACK_STEPS + 1])
        before, after = v[lo:mid], v[mid + 1 : hi]
        before = before[np.isfinite(before)]
        if before.size < SETBACK_STEPS // 2 or after.size < SETBACK_STEPS // 2:
            continue  # not enough on either side (yet): no verdict
        with np.errstate(invalid="ignore"):
            out[i] = not np.isfinite(after).all() or bool(
                np.median(after) >= t.loss_setback * np.median(before) > 0
            )
    return out


def _relative(rec: Records, t: Thresholds) -> list[Episode]:
    """History-free: in the first ``min_history`` steps (the spike rules have no history to
    compare with yet), a weight matrix whose gradient norm is at least ``grad_weight_ratio``
    times the weight's own norm (at least the norm PyTorch's default init gives its shape) on
    a sampled step where the update moved the weight by more than ``update_high`` of itself
    (a recurrent weight scaled 3x: gradients hundreds of times the weights at step 0)."""
    steps, names, w = rec.wide("weight_norm", "param")
    if not steps.size:
        return []
    early = steps < t.min_history
    if not early.any():
        return []
    cols = [j for j, n in enumerate(names) if rec.layers.ndim.get(n, 0) >= 2]
    names = [names[j] for j in cols]
    w = w[:, cols]
    g = rec.aligned("grad_norm", "param", steps, names)
    # a weight smaller than PyTorch's default init would make it (zero-initialised, LoRA's B,
    # a layer built by hand) is measured against that init norm: sqrt(rows / 3) (a uniform
    # init of bound 1/sqrt(fan_in)), or a small weight would make any gradient look huge
    floor = np.array([np.sqrt(max(rec.layers.shape.get(n, (3,))[0], 1) / 3.0) for n in names])
    # ...and the gradient must have moved the weight by a large fraction of itself (the update
    # ratio above update_high on that step): a gradient scaled up by a summed loss, or by no
    # learning rate at all, is not an explosion of the training
    moved = rec.aligned("update_ratio", "param", steps, names) > t.update_high
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.isfinite(w) & np.isfinite(g) & moved, g / np.maximum(w, floor), np.nan)
    out: list[tuple[float, Episode]] = []
    for j, name in enumerate(names):
        with np.errstate(invalid="ignore"):
            rows = np.flatnonzero(early & (rel[:, j] >= t.grad_weight_ratio))
        if not rows.size or steps[rows[-1]] < rec.since - t.min_history:
            continue
        peak = rows[np.argmax(rel[rows, j])]
        ratio = float(rel[peak, j])
        step = int(steps[peak])
        ev = {
            "grad_weight_ratio": ratio,
            "grad_norm": float(g[peak, j]),
            "weight_norm": float(w[peak, j]),
            "peak_step": step,
        }
        msg = (
            f"gradient of {name} is {fmt(ratio)}x the weight's own norm at step {step} "
            f"(||g|| {fmt(float(g[peak, j]))}, ||w|| {fmt(float(w[peak, j]))}): the run starts "
            "with exploding gradients, before any history to compare with"
        )
        hint = (
            "initialise with a smaller scale (He/Xavier init; orthogonal init, nn.init."
            "orthogonal_, for recurrent weights), add normalisation, or "
            + _clip_hint(rec, int(steps[rows[0]]))
        )
        ep = Episode(
            "exploding_gradients",
            name,
            int(steps[rows[0]]),
            int(steps[rows[-1]]),
            "error" if ratio >= 10 * t.grad_weight_ratio else "warning",
            ev,
            msg,
            hint,
            cause="relative",
        )
        out.append((ratio, ep))
    return keep_strongest(out)


def _clusters(steps: np.ndarray, hot: np.ndarray, patience: int, gap: int) -> list[tuple[int, int]]:
    """Index ranges of clusters of hot observations: at least ``patience`` of them, each within
    ``gap`` steps of the previous one. Consecutive spikes are a cluster, and so are spikes that
    keep coming back (an RNN whose gradient explodes every few dozen steps); a single one is
    not (one bad batch: see ``spike_once_ratio`` and ``loss_spike``)."""
    idx = np.flatnonzero(hot)
    out: list[tuple[int, int]] = []
    start = 0
    for k in range(1, idx.size + 1):
        if k == idx.size or steps[idx[k]] - steps[idx[k - 1]] > gap:
            if k - start >= patience:
                out.append((int(idx[start]), int(idx[k - 1])))
            start = k
    return out


def _overflow(rec: Records) -> list[Episode]:
    """An infinite norm of finite elements: the fp32 sum of squares overflowed (a norm above
    about 1.8e19; docs/findings.md, "exploding_gradients", Overflow)."""
    steps, names, norms = rec.wide("grad_norm", "param")
    if not steps.size:
        return []
    counts = rec.aligned("grad_nonfinite", "param", steps, names)
    out: list[tuple[float, Episode]] = []
    for j, name in enumerate(names):
        rows = np.flatnonzero(np.isinf(norms[:, j]) & (counts[:, j] == 0) & (steps >= rec.since))
        if rows.size:
            first, last = int(steps[rows[0]]), int(steps[rows[-1]])
            msg = (
                f"gradient of {name} is so large that its norm overflows float32 although "
                f"every element is finite (step {first})"
            )
            clip_ev = _clipped(rec, first, last, None)
            ep = Episode(
                "exploding_gradients",
                name,
                first,
                last,
                "error",
                {"overflow_steps": int(rows.size), **clip_ev},
                msg + _clip_note(rec, clip_ev, last),
                _clip_hint(rec, first) + "; " + _lower_lr_hint(rec),
                cause="overflow",
            )
            out.append((-float(first), ep))  # the earliest overflow names the finding
    return keep_strongest(out)


def before_divergence(rec: Records, steps: np.ndarray, window: int) -> np.ndarray:
    """Rows of ``steps`` within ``window`` steps before the run's first non-finite loss or
    total gradient norm (not that step itself, whose update is made of the non-finite values,
    nor any after it: by then the weights are poisoned)."""
    out = np.zeros(steps.size, dtype=bool)
    first: float = np.inf
    for metric in ("loss", "grad_norm_total"):
        s2, _, v = rec.wide(metric, "run")
        bad = np.flatnonzero(np.isinf(v[:, 0])) if s2.size else np.zeros(0, dtype=np.int64)
        if bad.size:  # (a NaN was stored as inf)
            first = min(first, float(s2[bad[0]]))
    if np.isfinite(first) and _loss_rose(rec, int(first), window):
        out = (steps < first) & (steps >= first - window)
    return out


def _loss_rose(rec: Records, first: int, window: int) -> bool:
    """Whether the loss climbed into the non-finite step at ``first`` (a divergence: the median
    of the last ``SETBACK_STEPS`` finite losses before it at least twice the median of the
    ``window`` before those), rather than turning non-finite out of a healthy run (a sqrt at 0,
    a log of 0: a numerical accident, not a learning rate). True where no loss was recorded."""
    s2, _, loss = rec.wide("loss", "run")
    if not s2.size:
        return True
    v = loss[:, 0]
    before = v[(s2 < first) & np.isfinite(v)]
    recent, earlier = before[-SETBACK_STEPS:], before[-SETBACK_STEPS - window : -SETBACK_STEPS]
    if not recent.size or not earlier.size:
        return True  # diverged before there was a history: nothing says otherwise
    return bool(np.median(recent) >= 2 * np.median(earlier))


def not_learning(
    rec: Records, steps: np.ndarray, t: Thresholds, unknown: bool = True
) -> np.ndarray:
    """Rows where the loss's median over the last ``history`` steps is still above
    ``learn_progress`` times the run's first loss (``unknown`` where no loss was recorded,
    and in the first ``history`` steps, too early to tell)."""
    s2, _, loss = rec.wide("loss", "run")
    start = rec.first_seen.get((RUN_LAYER, "run", "loss"))
    if not s2.size or start is None or not np.isfinite(start[1]) or start[1] <= 0:
        return np.full(steps.size, unknown)
    v = loss[:, 0]
    out = np.full(steps.size, unknown)
    for i, step in enumerate(steps.tolist()):
        if step - start[0] < t.history:
            continue  # too early to say whether the loss falls: ``unknown``
        sel = (s2 <= step) & (s2 > step - t.history) & np.isfinite(v)
        if sel.any():
            out[i] = float(np.median(v[sel])) > t.learn_progress * start[1]
    return out


def _site_module(site: str) -> str:
    return site.split("#", 1)[0]


def _depth(rec: Records, t: Thresholds) -> list[Episode]:
    steps, sites, g = rec.wide("output_grad_norm", "module")
    found: list[Episode] = []
    keep = [j for j, s in enumerate(sites) if _site_module(s) not in rec.layers.containers]
    if len(keep) < len(sites):  # a container's output is a later module's: not a depth point
        sites, g = [sites[j] for j in keep], g[:, keep]
    if steps.size and sites:
        # the milder vanishing view counts only from the run's first check on, without a break
        # (a vanishing init shows at once; a later dip belongs to another pathology)
        fits = fit_rows(g)
        logr = np.array([f[0] if f else np.nan for f in fits])
        with np.errstate(invalid="ignore"):
            shallow = logr <= np.log10(t.depth_starve_ratio)
            # both consequences: the early layers do not learn *while* the loss does not fall
            # (either alone fired on a healthy 4-3-3-1 ReLU net trained one example per step)
            starved = (_learning_gap(rec, steps) <= np.log10(t.learn_gap_ratio)) & not_learning(
                rec, steps, t, unknown=False
            )
        starts = [v[0] for k, v in rec.first_seen.items() if k[2] == "output_grad_norm"]
        from_start = np.logical_and.accumulate(shallow) & (int(steps[0]) <= min(starts, default=0))
        mild = from_start & starved
        # only the new rows and enough before them to complete a run of `patience` checks:
        # older rows were judged at an earlier flush (their findings are extended, not redone)
        first = max(0, int(np.searchsorted(steps, rec.since)) - t.patience)
        steps, fits, mild = steps[first:], fits[first:], mild[first:]
        dead = _dead_rows(rec, steps, t)
        found += _depth_episodes(rec, t, steps, sites, fits, dead, mild, "backward signal")
    found += _weight_depth(rec, t)
    return found


def fit_rows(g: np.ndarray) -> list[tuple[float, int, int, int] | None]:
    """For each row (one step's backward signal over the forward order), a least-squares line
    through the log10 of its positive finite values against their order:
    ``(log10 first/last ratio, values used, first column, last column)``, or None with fewer
    than 3 values. Vectorised over rows (one fit per sampled step at every flush)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(g) & (g > 0)
        y = np.where(ok, np.log10(np.where(ok, g, 1.0)), 0.0)
    n = ok.sum(axis=1).astype(float)
    x = np.where(ok, np.cumsum(ok, axis=1) - 1, 0).astype(float)
    sx, sy = x.sum(axis=1), y.sum(axis=1)
    sxx, sxy = (x * x).sum(axis=1), (x * y).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    out: list[tuple[float, int, int, int] | None] = []
    for i in range(g.shape[0]):
        if n[i] < 3 or not np.isfinite(slope[i]):
            out.append(None)
            continue
        cols = np.flatnonzero(ok[i])
        out.append((-float(slope[i]) * float(n[i] - 1), int(n[i]), int(cols[0]), int(cols[-1])))
    return out


def _dead_rows(rec: Records, steps: np.ndarray, t: Thresholds) -> np.ndarray:
    """Steps where some rectifier is mostly dead: gradients stop there for that reason."""
    s2, _, dead = rec.wide("act_dead_fraction", "module")
    out = np.zeros(steps.size, dtype=bool)
    if not s2.size:
        return out
    with np.errstate(invalid="ignore"):
        bad = np.nanmax(np.where(np.isnan(dead), -1.0, dead), axis=1) >= t.dead_fraction
    rows = np.searchsorted(s2, steps)
    ok = rows < s2.size
    out[ok] = bad[rows[ok]] & (s2[rows[ok]] == steps[ok])
    return out


def _depth_episodes(
    rec: Records,
    t: Thresholds,
    steps: np.ndarray,
    names: list[str],
    fits: list[tuple[float, int, int, int] | None],
    dead: np.ndarray,
    mild: np.ndarray,
    signal: str,
) -> list[Episode]:
    """``mild``: rows where the milder vanishing view holds (the depth ratio at or below
    ``depth_starve_ratio`` with its consequence, the first weight matrix barely moving, from
    the run's first check on)."""
    logr = np.array([f[0] if f else np.nan for f in fits])
    out: list[Episode] = []
    gap = _learning_gap(rec, steps)
    diverging = before_divergence(rec, steps, t.history)
    with np.errstate(invalid="ignore"):
        explode = logr >= np.log10(t.depth_explode_ratio)
        # a collapse this deep is a finding on its own; a milder one when its consequence is
        # seen too (``mild``)
        vanish = ((logr <= np.log10(t.depth_vanish_ratio)) | mild) & ~dead
    for kind, mask in (("exploding_gradients", explode), ("vanishing_gradients", vanish)):
        # growth with depth right before the run diverges is the cause: no patience (a deep
        # ReLU net at 2x the He gain turns non-finite before its third sampled check)
        spans = [
            (a, b)
            for a, b in runs(mask, 1)
            if b - a + 1 >= t.patience or (kind == "exploding_gradients" and diverging[a])
        ]
        for a, b in spans:
            if steps[b] < rec.since:
                continue
            fit = fits[b]
            assert fit is not None
            log_ratio, count, first, last = fit
            ratio = 10**log_ratio
            per_layer = 10 ** (log_ratio / max(count - 1, 1))
            layer = _site_module(names[first])
            ev: dict[str, Any] = {
                "signal": signal,
                "first_last_update_ratio": None if np.isnan(gap[b]) else float(10 ** gap[b]),
                "first_last_ratio": ratio,
                "per_layer_factor": per_layer,
                "layers_measured": count,
                "first_layer": names[first],
                "last_layer": names[last],
                "checks": int(b - a + 1),
            }
            if kind == "exploding_gradients":
                msg = (
                    f"{signal} grows {fmt(ratio)}x from {names[last]} back to {layer} "
                    f"(x{fmt(per_layer)} per layer over {count} layers)"
                )
                hint = (
                    "initialise with the right gain (He/Kaiming for ReLU: "
                    "nn.init.kaiming_normal_; Xavier for tanh/sigmoid); "
                    + normalisation(rec.context)
                    + "; add residual connections; "
                    + _clip_hint(rec, int(steps[a]))
                )
                sev = "warning"
            else:
                msg = (
                    f"{signal} shrinks to {fmt(ratio)}x from {names[last]} back to {layer} "
                    f"(x{fmt(per_layer)} per layer over {count} layers): the first layers "
                    "barely learn"
                )
                hint = _vanish_hint(rec)
                sev = "warning"
            out.append(
                Episode(
                    kind, layer, int(steps[a]), int(steps[b]), sev, ev, msg, hint, cause="depth"
                )
            )
    return out


def _learning_gap(rec: Records, steps: np.ndarray) -> np.ndarray:
    """For each of ``steps``: log10 of the update ratio of the earliest weight matrix over
    that of the latest (NaN where either was not measured at that step). Near 0 when every
    layer learns at the same relative rate; far below 0 when the first layers barely move."""
    s2, names, r = rec.wide("update_ratio", "param")
    out = np.full(steps.size, np.nan)
    weights = [j for j, n in enumerate(names) if rec.layers.ndim.get(n, 0) >= 2]
    if not s2.size or len(weights) < 2:
        return out
    first, last = r[:, weights[0]], r[:, weights[-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where((first > 0) & (last > 0), np.log10(first / last), np.nan)
    rows = np.searchsorted(s2, steps)
    ok = (rows < s2.size) & (s2[np.minimum(rows, s2.size - 1)] == steps)
    out[ok] = gap[rows[ok]]
    return out


_SQUASHING = ("Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid", "Tanhshrink")


def _vanish_hint(rec: Records) -> str:
    """What to try for a vanishing backward signal, from the model's own activations and
    normalisation."""
    ctx = rec.context
    squashing = [a for a in ctx.activations if a in _SQUASHING]
    parts = [
        "use He/Kaiming init with ReLU (nn.init.kaiming_normal_) or Xavier with "
        "tanh/sigmoid (nn.init.xavier_uniform_)"
    ]
    if squashing:
        parts.append(f"replace the hidden {'/'.join(squashing)} activations with ReLU")
    elif not ctx.activations:
        parts.append("use ReLU-family hidden activations rather than sigmoid/tanh")
    parts.append(normalisation(ctx))
    parts.append("add residual connections")
    return "; ".join(parts)


def _weight_depth(rec: Records, t: Thresholds) -> list[Episode]:
    """Vanishing seen in ``||g|| / ||w||`` of the earliest weight matrix against the latest,
    where no backward signal was recorded (torch.compile, or backward_signal=False)."""
    s_sig, _, _ = rec.wide("output_grad_norm", "module")
    if s_sig.size:
        return []
    steps, names, w = rec.wide("weight_norm", "param")
    weights = [j for j, n in enumerate(names) if rec.layers.ndim.get(n, 0) >= 2]
    if not steps.size or len(weights) < 2:
        return []
    names = [names[j] for j in weights]
    w = w[:, weights]
    g = rec.aligned("grad_norm", "param", steps, names)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = g / w
    first, last = rel[:, 0], rel[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first / last
    mask = np.isfinite(ratio) & (first > 0) & (ratio <= t.weight_vanish_ratio)
    mask &= ~_dead_rows(rec, steps, t)
    out: list[Episode] = []
    for a, b in runs(mask, t.patience):
        if steps[b] < rec.since:
            continue
        r = float(ratio[b])
        layer = rec.layers.module_of.get(names[0], names[0])
        msg = (
            f"relative gradient ||g||/||w|| of {names[0]} is {fmt(r)}x that of {names[-1]}: "
            "the first layers barely learn"
        )
        hint = _vanish_hint(rec)
        out.append(
            Episode(
                "vanishing_gradients",
                layer,
                int(steps[a]),
                int(steps[b]),
                "warning",
                {
                    "signal": "weight gradients",
                    "first_last_ratio": r,
                    "first_layer": names[0],
                    "last_layer": names[-1],
                },
                msg,
                hint,
            )
        )
    return out
