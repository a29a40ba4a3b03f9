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
            median, on ``patience`` steps each within ``history`` steps of the previous (a
            cluster of spikes, consecutive or recurring). Pascanu et al. 2013 found clipping
            thresholds from 0.5x to 10x the average norm still converge; above 10x is outside
            that range. Measured on 14 healthy runs: single steps reach 30x (small batches), but
            never three within 50 steps.
        spike_once_ratio: One step this far above the median is raised without patience (a
            single poisoned batch can wreck Adam's moment estimates); 3x the largest healthy
            single-step ratio measured.
        spike_z: ...and the norm's robust z-score (median/MAD of log-norms over the window) must
            be at least this (ZClip clips at z > 2.5; healthy runs measured up to 5.7, but never
            together with a 10x ratio).
        depth_explode_ratio: Exploding with depth: the backward signal (norm of the gradient with
            respect to each module's output) at the earliest module over the latest, from a
            log-linear fit over the forward order, at or above this. Glorot & Bengio 2010 (eq.
            13): the back-propagated variance scales as [n Var(W)]^depth. Measured over 15
            healthy runs (MLPs with SGD/Adam, He-init 8-layer MLP, tanh/Xavier, CNN+BN, GRU,
            LSTM LM, pre-norm transformers, autoencoder): 0.01 to 19; a 20-layer ReLU net at
            1.5x He gain: 940 to 2300. 200 sits 10x above the first and 4.7x below the second.
        depth_vanish_ratio: Vanishing with depth: the same ratio at or below this; 100x below
            the smallest healthy value measured (0.01, an LSTM language model), where a deep
            sigmoid MLP measures 3e-10.
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
        loss_spike_max: ...and at least this many times the largest loss of the trailing window.
            Healthy small-batch runs measured a loss 11x its median (z 12) but never above 1.6x
            the window's maximum: a noisy loss is not a spike; a bad batch is (1e6x in the
            poisoned-batch example).
        merge_gap: A condition that returns within this many steps extends the same finding.
    """

    patience: int = 3
    history: int = 50
    min_history: int = 20
    spike_ratio: float = 10.0
    spike_once_ratio: float = 100.0
    spike_z: float = 3.5
    depth_explode_ratio: float = 200.0
    depth_vanish_ratio: float = 1e-4
    weight_vanish_ratio: float = 1e-3
    dead_fraction: float = 0.4
    dead_min_samples: int = 8
    saturation_fraction: float = 0.5
    update_high: float = 0.1
    update_low: float = 1e-6
    update_warmup: int = 50
    loss_spike_ratio: float = 3.0
    loss_spike_z: float = 8.0
    loss_spike_max: float = 2.0
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
