"""The numbers the rules decide with, each with where its default comes from.

``watch(model, thresholds={"dead_fraction": 0.6})`` overrides any of them; an unknown name fails
with a one-line error that lists the accepted ones.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of the diagnosis rules.

    Attributes:
        patience: Consecutive checks a condition must hold before it is raised (activation and
            update statistics are checked on sampled steps, gradient norms on every step).
            Spikes (one step far outside the history) and non-finite values are raised at once.
        history: Observations in the trailing window that a norm or loss is compared with.
            ZClip (Kumar et al. 2025) warms its statistics up over 25 steps; twice that keeps one
            noisy phase from defining "normal".
        min_history: Observations needed before a spike can be called one (fewer: no verdict).
        spike_ratio: Exploding gradients: a norm at least this many times its own trailing
            median, for ``patience`` steps. Pascanu et al. 2013 found clipping thresholds from
            0.5x to 10x the average norm still converge; above 10x is outside that range.
        spike_once_ratio: One step this far above the median is raised without patience (a
            single poisoned batch can wreck Adam's moment estimates).
        spike_z: ...and the norm's robust z-score (median/MAD of log-norms over the window) must
            be at least this. ZClip acts at z > 2.5; an alarm must be far rarer than a clip, and
            on our healthy baselines the largest robust z over a run was below 5 (measured).
        depth_explode_ratio: Exploding with depth: the backward signal (RMS gradient with respect
            to module outputs) at the earliest module over the latest, from a log-linear fit
            over the forward order. Glorot & Bengio 2010 (eq. 13): the back-propagated variance
            scales as [n Var(W)]^depth; 1e3 is ten layers at a per-layer gain of 2.
        depth_vanish_ratio: Vanishing with depth: the same ratio at or below this. A 3-layer MLP
            with PyTorch's default init measures about 0.1-0.2 (gain 1/sqrt(6) per ReLU layer);
            1e-2 leaves a 10x margin.
        weight_vanish_ratio: Vanishing seen in weight gradients: ``||g||/||w||`` of the earliest
            weight over the latest at or below this. Glorot & Bengio 2010 (eq. 14): in the linear
            regime weight-gradient variances are equal across layers, so a thousandfold gap is
            not an init artefact.
        dead_fraction: Dead units: fraction of a rectifier's units that are zero for every
            example of the step, at or above this. Measured (notes/remedies.md): Adam at lr 1e-3
            leaves 0-2% dead, lr 0.1 kills 90-95%.
        dead_min_samples: Examples (and positions) per unit needed for a dead-fraction check: a
            healthy unit active half the time is zero on 8 examples with probability 0.4%.
        saturation_fraction: Saturation: fraction of sigmoid/tanh outputs pinned at their limits
            (``sigmoid_saturation``/``tanh_saturation`` in the config), at or above this. Glorot &
            Bengio 2010 (Fig. 2, 3) show whole layers pinned when training stalls.
        update_high: Update-to-weight ratio above this (per weight matrix, after warm-up) is too
            large. CS231n's band is about 1e-3; Adam's first steps reach about 3e-2 by design
            (lr 1e-3, 256x256, measured), so this is 3x above that and 100x above the band.
        update_low: Below this (and not exactly zero) the layer barely moves: 1000x below the
            CS231n band.
        update_warmup: Steps ignored by the update-ratio rules (Adam's bias-corrected first
            steps move every coordinate by about lr).
        loss_spike_ratio: Loss spike: the loss at least this many times its trailing median...
        loss_spike_z: ...with a robust z-score (median/MAD) at least this...
        loss_spike_max: ...and at least this many times the largest loss of the trailing window
            (a noisy loss is not a spike).
        merge_gap: A condition that returns within this many steps extends the same finding.
    """

    patience: int = 3
    history: int = 50
    min_history: int = 20
    spike_ratio: float = 10.0
    spike_once_ratio: float = 100.0
    spike_z: float = 3.5
    depth_explode_ratio: float = 1e3
    depth_vanish_ratio: float = 1e-2
    weight_vanish_ratio: float = 1e-3
    dead_fraction: float = 0.4
    dead_min_samples: int = 8
    saturation_fraction: float = 0.5
    update_high: float = 0.1
    update_low: float = 1e-6
    update_warmup: int = 50
    loss_spike_ratio: float = 3.0
    loss_spike_z: float = 8.0
    loss_spike_max: float = 1.5
    merge_gap: int = 200

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            integer = f.type in ("int", int)
            ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
            if not ok or not math.isfinite(value) or value < (1 if integer else 0) or (
                not integer and value == 0
            ):
                kind = "an integer >= 1" if integer else "a finite number > 0"
                raise ValueError(f"thresholds: {f.name}={value!r}: expected {kind}")
        if self.min_history > self.history:
            raise ValueError(
                f"thresholds: min_history={self.min_history} is larger than "
                f"history={self.history}: expected min_history <= history"
            )

    @classmethod
    def from_any(cls, value: object) -> Thresholds:
        """A Thresholds from an instance, a mapping of overrides, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(
                f"thresholds={value!r:.60}: expected a dict of overrides such as "
                "{'dead_fraction': 0.6}"
            )
        known = [f.name for f in fields(cls)]
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"thresholds: unknown name {key!r}{hint}; accepted: {', '.join(known)}"
                )
        return cls(**value)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
