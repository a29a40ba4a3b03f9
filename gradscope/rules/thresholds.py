"""The numbers the rules decide with, each with where its default comes from and the values it
accepts.

``watch(model, thresholds={"dead_fraction": 0.6})`` overrides any of them; an unknown name, or a
value outside its range (a fraction above 1, a spike ratio below 1...: a rule that could never
fire, or would fire on everything), fails with a one-line error that names it and says what is
accepted.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Range:
    """The values one threshold accepts: a finite number (an integer when ``integer``) from
    ``low`` to ``high``, each end included unless it is ``*_open``."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __str__(self) -> str:
        if self.integer:
            return f"an integer >= {self.low:g}"
        if self.high == math.inf:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return (
            f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}"
        )

    def check(self, value: object) -> float:
        """``value`` as the threshold's type: an ``int``, or a ``float`` (an integer given for
        a float threshold, or a NumPy number, is converted).

        Raises:
            ValueError: Not a number of the right kind, not finite, or out of the range (the
                message is ``expected <the range>``).
        """
        number: float
        if isinstance(value, bool):
            raise ValueError(f"expected {self}")
        if isinstance(value, numbers.Integral):
            number = int(value)
        elif isinstance(value, numbers.Real) and not self.integer:
            number = float(value)
        else:
            raise ValueError(f"expected {self}")
        if not self.integer:
            number = float(number)
        if (
            not math.isfinite(number)
            or number < self.low
            or number > self.high
            or (self.low_open and number == self.low)
            or (self.high_open and number == self.high)
        ):
            raise ValueError(f"expected {self}")
        return number


def _count(default: int, low: int) -> Any:
    """A threshold that counts steps or observations: an integer >= ``low``."""
    return field(default=default, metadata={"range": Range(low, integer=True)})


def _number(default: float, range_: Range) -> Any:
    return field(default=default, metadata={"range": range_})


_RATIO = Range(1.0)  # "at least this many times": 1 leaves the other conditions to decide
_GROWTH = Range(1.0, low_open=True)  # "grows this many times": above 1
_SHRINK = Range(0.0, 1.0, low_open=True, high_open=True)  # "shrinks to this much": below 1
_FRACTION = Range(0.0, 1.0, low_open=True)  # a share of units or outputs; 0 would flag all
_POSITIVE = Range(0.0, low_open=True)


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of the diagnosis rules. Each says, last, the values it accepts.

    Attributes:
        patience: Consecutive checks a condition must hold before it is raised (activation and
            update statistics are checked on sampled steps, gradient norms on every step).
            Spikes (one step far outside the history) and non-finite values are raised at once.
            An integer >= 1.
        history: Observations in the trailing window that a norm or loss is compared with.
            ZClip (Kumar et al. 2025) warms its statistics up over 25 steps; twice that keeps one
            noisy phase from defining "normal". An integer >= 1, at least ``min_history``.
        min_history: Observations needed before a spike can be called one (fewer: no verdict).
            An integer >= 1, at most ``history``.
        spike_ratio: Exploding gradients: a norm at least this many times its own trailing
            median, on ``patience`` steps each within ``history`` steps of the previous (a
            cluster of spikes, consecutive or recurring). Pascanu et al. 2013 found clipping
            thresholds from 0.5x to 10x the average norm still converge; above 10x is outside
            that range. Measured on 14 healthy runs: single steps reach 30x (small batches), but
            never three within 50 steps. A number >= 1 (1: only ``spike_z`` decides).
        spike_once_ratio: One step this far above the median is raised without patience (a
            single poisoned batch can wreck Adam's moment estimates); 3x the largest healthy
            single-step ratio measured. The step must be a spike (``spike_ratio``, ``spike_z``)
            too, so a value below ``spike_ratio`` raises every spike at once. A number >= 1.
        loss_setback: ...or a single spike (``spike_ratio``, ``spike_z``) after which the
            loss's median over the next 10 steps is at least this many times its median over
            the previous 10: the step undid training. A number > 1.
        grad_weight_ratio: Exploding before any history exists (the first ``min_history``
            steps): a weight matrix's gradient norm at least this many times the weight's own
            norm on a sampled step. Corpus (calibration): healthy runs reach 0.91 at their
            first check, deep ReLU nets at 1.6-2x the He gain at least 35; 6 is near the middle
            of that gap on a log scale. A number > 0.
        spike_z: ...and the norm's robust z-score (median/MAD of log-norms over the window) must
            be at least this (ZClip clips at z > 2.5; healthy runs measured up to 5.7, but never
            together with a 10x ratio). A number > 0.
        depth_explode_ratio: Exploding with depth: the backward signal (norm of the gradient with
            respect to each module's output) at the earliest module over the latest, from a
            log-linear fit over the forward order, at or above this. Glorot & Bengio 2010 (eq.
            13): the back-propagated variance scales as [n Var(W)]^depth. Measured over 15
            healthy runs (MLPs with SGD/Adam, He-init 8-layer MLP, tanh/Xavier, CNN+BN, GRU,
            LSTM LM, pre-norm transformers, autoencoder): 0.01 to 19; a 20-layer ReLU net at
            1.5x He gain: 940 to 2300. 200 sits 10x above the first and 4.7x below the second.
            A number > 1 (a growth).
        depth_vanish_ratio: Vanishing with depth: the same ratio at or below this; 100x below
            the smallest healthy value measured (0.01, an LSTM language model), where a deep
            sigmoid MLP measures 3e-10. A number in (0, 1) (a shrinking).
        depth_starve_ratio: Vanishing with depth, milder: the same ratio at or below this
            counts when its consequence is measured as well: the first layers barely move
            (``learn_gap_ratio``) while the loss does not fall (``learn_progress``). A 12-layer
            tanh MLP with PyTorch's default init measures 1.1e-3 and learns only through its
            last layers. Only from the run's first checks (a vanishing init or architecture shows
            at once; a later dip is another pathology's: an LSTM at a diverging learning rate
            measured 1e-3 at step 110). Corpus (calibration): healthy runs measure no less than
            0.019 on their first checks. A number in (0, 1) (below ``depth_vanish_ratio``: that
            one decides).
        learn_gap_ratio: ...the consequence: the update ratio (``||dw||/||w||``) of the
            earliest weight matrix at or below this fraction of the latest one's on the same
            step (the first layers barely move while the last learn). Corpus (calibration):
            healthy runs no less than 0.017 (an LSTM language model). A number in (0, 1).
        weight_vanish_ratio: Vanishing seen in weight gradients: ``||g||/||w||`` of the earliest
            weight over the latest at or below this. Glorot & Bengio 2010 (eq. 14): in the linear
            regime weight-gradient variances are equal across layers, so a thousandfold gap is
            not an init artefact. A number in (0, 1).
        dead_fraction: Dead units: fraction of a rectifier's units that are zero for every
            example of the step, at or above this. Corpus (benchmarks/zoo, calibration part):
            healthy runs reach 0.56 on a step (a CNN with BatchNorm, an autoencoder's
            bottleneck), dying-ReLU runs at least 0.67; 0.6 is the middle of that gap on a log
            scale. A number in (0, 1] (1: only wholly dead layers).
        dead_min_samples: Examples (and positions) per unit needed for a dead-fraction check: a
            healthy unit active half the time is zero on 8 examples with probability 0.4%.
            An integer >= 1.
        saturation_fraction: Saturation: fraction of sigmoid/tanh outputs pinned at their limits
            (``sigmoid_saturation``/``tanh_saturation`` in the config), at or above this. Glorot &
            Bengio 2010 (Fig. 2, 3) show whole layers pinned when training stalls. A number in
            (0, 1].
        update_high: Update-to-weight ratio above this (per weight matrix, after warm-up) is too
            large. CS231n's band is about 1e-3; Adam's first steps reach about 3e-2 by design
            (lr 1e-3, 256x256, measured), so this is 3x above that and 100x above the band.
            A number > 0, above ``update_low``.
        update_low: Below this (and not exactly zero) the layer barely moves: 1000x below the
            CS231n band. A number > 0, below ``update_high``.
        update_broad: ...during warm-up, the median update ratio over the weight matrices
            (two or more) above this is the learning rate, on one check. Corpus (calibration):
            healthy runs reach 0.40 at their first check (a head fine-tuned at Adam 3e-2),
            too-high learning rates at least 1.38; 0.7 is the middle of that gap on a log scale.
            A number > 0.
        update_warmup: Steps ignored by the update-ratio rules (Adam's bias-corrected first
            steps move every coordinate by about lr). An integer >= 0 (0: no warm-up).
        learn_progress: A run is still learning while its loss (median of the last
            ``history`` steps) is below this fraction of its first loss; tiny updates of a run
            that has learnt are convergence, not a finding. A number in (0, 1).
        loss_spike_ratio: Loss spike: the loss at least this many times its trailing median...
            A number >= 1 (1: the other two conditions decide).
        loss_spike_z: ...with a robust z-score (median/MAD) at least this... A number > 0.
        loss_spike_max: ...and at least this many times the largest loss of the trailing window.
            Healthy small-batch runs measured a loss 11x its median (z 12) but never above 1.6x
            the window's maximum: a noisy loss is not a spike; a bad batch is (1e6x in the
            poisoned-batch example). A number >= 1 (1: a new maximum).
        loss_spike_log_z: ...and a robust z-score of ``log10(loss)`` at least this: the spike
            judged against the loss's own spread, which is wide where the batch is small. A
            healthy run at batch size 1 measured up to 2.6 (one hard example at 3.6x the
            median). Corpus (calibration): healthy runs reach 4.4, poisoned batches at least
            30; 10 is near the middle of that gap on a log scale. A number > 0.
        merge_gap: A condition that returns within this many steps extends the same finding.
            An integer >= 0 (0: only a condition that continues without a gap).
    """

    patience: int = _count(3, 1)
    history: int = _count(50, 1)
    min_history: int = _count(20, 1)
    spike_ratio: float = _number(10.0, _RATIO)
    spike_once_ratio: float = _number(100.0, _RATIO)
    spike_z: float = _number(3.5, _POSITIVE)
    grad_weight_ratio: float = _number(6.0, _POSITIVE)
    loss_setback: float = _number(1.5, _GROWTH)
    depth_explode_ratio: float = _number(200.0, _GROWTH)
    depth_vanish_ratio: float = _number(1e-4, _SHRINK)
    depth_starve_ratio: float = _number(1e-2, _SHRINK)
    learn_gap_ratio: float = _number(1e-2, _SHRINK)
    weight_vanish_ratio: float = _number(1e-3, _SHRINK)
    dead_fraction: float = _number(0.6, _FRACTION)
    dead_min_samples: int = _count(8, 1)
    saturation_fraction: float = _number(0.5, _FRACTION)
    update_high: float = _number(0.1, _POSITIVE)
    update_low: float = _number(1e-6, _POSITIVE)
    update_broad: float = _number(0.7, _POSITIVE)
    update_warmup: int = _count(50, 0)
    learn_progress: float = _number(0.9, _SHRINK)
    loss_spike_ratio: float = _number(3.0, _RATIO)
    loss_spike_z: float = _number(8.0, _POSITIVE)
    loss_spike_max: float = _number(2.0, _RATIO)
    loss_spike_log_z: float = _number(10.0, _POSITIVE)
    merge_gap: int = _count(200, 0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, f.metadata["range"].check(value))
            except ValueError as exc:
                raise ValueError(f"thresholds: {f.name}={value!r}: {exc}") from None
        if self.min_history > self.history:
            raise ValueError(
                f"thresholds: min_history={self.min_history} is larger than "
                f"history={self.history}: expected min_history <= history"
            )
        if self.update_low >= self.update_high:
            raise ValueError(
                f"thresholds: update_low={self.update_low:g} is not below "
                f"update_high={self.update_high:g}: expected update_low < update_high (every "
                "update ratio would be flagged)"
            )

    @classmethod
    def range_of(cls, name: str) -> Range:
        """The values the threshold ``name`` accepts.

        Raises:
            TypeError: No threshold has that name (the message suggests the closest and lists
                the accepted ones).
        """
        for f in fields(cls):
            if f.name == name:
                range_: Range = f.metadata["range"]
                return range_
        known = [f.name for f in fields(cls)]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"unknown name {name!r}{hint}; accepted: {', '.join(known)}")

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
        for key in value:
            try:
                cls.range_of(key)
            except TypeError as exc:
                raise TypeError(f"thresholds: {exc}") from None
        return cls(**value)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
