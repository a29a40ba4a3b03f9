"""Loss spikes: the loss far above its own trailing history."""

from __future__ import annotations

import numpy as np

from ..records import RUN_LAYER
from .advice import lower_lr, option, setting
from .base import Episode, Records, fmt, runs, trailing_stats
from .thresholds import Thresholds

_Z = 1.4826
_LOG_MAD_FLOOR = 0.01  # log10 units: a loss that never varies still has 2% noise


def loss_spike(rec: Records, t: Thresholds) -> list[Episode]:
    """The loss at least ``loss_spike_ratio`` x its trailing median, ``loss_spike_max`` x the
    largest loss of the window, ``loss_spike_z`` robust deviations above the median, and
    ``loss_spike_log_z`` robust deviations above it on a log scale. A spike
    is raised at once (one bad batch is the classic case); consecutive spiking steps form one
    finding. A non-finite loss is a ``nonfinite`` finding, not a spike."""
    steps, _, loss = rec.wide("loss", "run")
    if not steps.size:
        return []
    need = steps >= rec.since
    med, mad, top = trailing_stats(loss, t.history, t.min_history, need)
    v, m, d, hi = loss[:, 0], med[:, 0], mad[:, 0], top[:, 0]
    with np.errstate(invalid="ignore"):
        z = (v - m) / np.maximum(_Z * d, 1e-12 + 1e-6 * np.abs(m))
        above = np.where(m > 0, v >= t.loss_spike_ratio * m, True)
        above_top = np.where(hi > 0, v >= t.loss_spike_max * hi, v > hi)
        spike = np.isfinite(v) & np.isfinite(m) & above & above_top & (z >= t.loss_spike_z)
    lz = np.full(v.shape, np.nan)
    if spike.any():
        # judged against the loss's own noise on a log scale as well: at batch size 1 one hard
        # example is 20x the median and still ordinary (log-scale z below 3, measured); a
        # poisoned batch is orders of magnitude outside that spread
        with np.errstate(divide="ignore", invalid="ignore"):
            logv = np.where(loss > 0, np.log10(loss), np.nan)
        lmed, lmad, _ = trailing_stats(logv, t.history, t.min_history, need & spike)
        with np.errstate(invalid="ignore"):
            lz = (logv[:, 0] - lmed[:, 0]) / np.maximum(_Z * lmad[:, 0], _LOG_MAD_FLOOR)
            quiet = lz < t.loss_spike_log_z  # no log view (a loss <= 0): the rest decides
        # within the loss's log-scale noise, a step is still a bad batch when its gradients
        # spiked with it (a batch of mislabelled examples: the loss doubles, the total
        # gradient norm jumps tenfold)
        spike &= ~(quiet & ~_gradients_spiked(rec, steps, t))
    grads = _gradients_spiked(rec, steps, t) if spike.any() else spike
    out: list[Episode] = []
    for a, b in runs(spike, 1):
        if steps[b] < rec.since:
            continue
        peak = a + int(np.argmax(v[a : b + 1]))
        ev = {
            "loss": float(v[peak]),
            "median_loss": float(m[peak]),
            "ratio": float(v[peak] / m[peak]) if m[peak] > 0 else None,
            "robust_z": float(z[peak]),
            "log_z": float(lz[peak]) if np.isfinite(lz[peak]) else None,
            "peak_step": int(steps[peak]),
            "steps": int(b - a + 1),
            "gradients_spiked": bool(grads[peak]),
        }
        when = (
            f"at step {int(steps[a])}" if a == b else f"over steps {int(steps[a])}-{int(steps[b])}"
        )
        msg = (
            f"loss spiked to {fmt(float(v[peak]))} {when}, against a median of "
            f"{fmt(float(m[peak]))} over the previous {t.history} steps"
            + (", and the total gradient norm spiked with it: one bad batch" if grads[peak] else "")
        )
        ctx = rec.context
        clip = (
            "clip gradients so one batch cannot throw the weights far "
            f"({option('clip', 'zclip')}, or torch.nn.utils.clip_grad_norm_)"
            if ctx.clip is None
            else f"clipping ({setting('clip', ctx.clip)}) already bounds how far one batch "
            "throws the weights"
        )
        hint = (
            f"inspect the batch of step {int(steps[peak])} (bad labels, unnormalised or "
            f"corrupted inputs); {clip}; if spikes recur, {lower_lr(ctx)}"
        )
        sev = "error" if ev["ratio"] is not None and ev["ratio"] >= 100 else "warning"
        out.append(
            Episode("loss_spike", RUN_LAYER, int(steps[a]), int(steps[b]), sev, ev, msg, hint)
        )
    return out


def _gradients_spiked(rec: Records, steps: np.ndarray, t: Thresholds) -> np.ndarray:
    """Rows of ``steps`` whose total gradient norm spiked: at least ``spike_ratio`` x the
    median of the ``history`` finite norms before it and ``spike_z`` robust deviations above
    it, on a log scale (as the exploding-gradients rule judges a spike: a norm that already
    swings by orders of magnitude, as a model at a loss near 0 does, does not spike)."""
    out = np.zeros(steps.size, dtype=bool)
    s2, _, total = rec.wide("grad_norm_total", "run")
    if not s2.size:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.where(total > 0, np.log10(total), np.nan)
    med, mad, _ = trailing_stats(logn, t.history, t.min_history)
    with np.errstate(invalid="ignore"):
        excess = logn[:, 0] - med[:, 0]
        z = excess / np.maximum(_Z * mad[:, 0], _LOG_MAD_FLOOR)
        hot = np.isfinite(excess) & (excess >= np.log10(t.spike_ratio)) & (z >= t.spike_z)
    rows = np.searchsorted(s2, steps)
    ok = (rows < s2.size) & (s2[np.minimum(rows, s2.size - 1)] == steps)
    out[ok] = hot[rows[ok]]
    return out
