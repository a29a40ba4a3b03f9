"""What every rule sees and returns: a window of records, and episodes.

A rule is a pure function ``rule(records, thresholds) -> list[Episode]``. ``records`` is a window
of the run's recent history (host numbers only, already flushed), in wide form per metric: one row
per step, one column per layer, NaN where nothing was recorded. An episode is one stretch of steps
where a condition held; the :class:`~gradscope.rules.engine.Diagnoser` turns episodes into
findings, extending a finding when its condition continues instead of raising it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .advice import RunContext

SEVERITIES = ("error", "warning", "info")


@dataclass
class Episode:
    """One stretch of steps where a rule's condition held on one layer."""

    kind: str
    layer: str
    first_step: int
    last_step: int
    severity: str
    evidence: dict[str, Any]
    message: str
    suggestion: str
    extra: dict[str, Any] = field(default_factory=dict)  # nonfinite: phase, module, class
    cause: str = ""
    """What episodes of one kind must share to be grouped into one finding (the Diagnoser
    groups episodes of the same kind and cause over overlapping steps)."""
    strength: float | None = None
    """How strongly the condition held (set by :func:`keep_strongest`): the strongest of a
    group names the finding; None: the first in forward order does."""
    layers: list[str] = field(default_factory=list)
    """Other layers the rule itself folded into this episode (a dead cascade)."""


@dataclass
class LayerInfo:
    """What rules need to know about layers: forward order, activation family, shapes.

    Attributes:
        rank: Forward-order position of each parameter and activation site (lower runs first).
        family: Activation family of each site (``"rectifier"``, ``"sigmoid"``, ...) or None.
        module_type: Class name of the module behind each site and parameter.
        module_of: Owning module of each parameter.
        ndim: Number of dimensions of each parameter.
        shape: Shape of each parameter, where known.
        containers: Modules that hold other watched modules (a model's root with a parameter of
            its own, a block): their output is a later module's output, but they start first,
            so they are left out of the order-based depth view.
        functional: For a functional activation site, what it is in words
            (``"F.relu after conv1"``).
    """

    rank: dict[str, int] = field(default_factory=dict)
    family: dict[str, str | None] = field(default_factory=dict)
    module_type: dict[str, str] = field(default_factory=dict)
    module_of: dict[str, str] = field(default_factory=dict)
    ndim: dict[str, int] = field(default_factory=dict)
    containers: set[str] = field(default_factory=set)
    shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    functional: dict[str, str] = field(default_factory=dict)

    def ordered(self, layers: list[str]) -> list[str]:
        """``layers`` in forward order (unknown ones last, in the given order)."""
        big = len(self.rank) + 1
        given: dict[str, int] = {}
        for i, name in enumerate(layers):
            given.setdefault(name, i)  # (list.index per key made this quadratic)
        return sorted(layers, key=lambda name: (self.rank.get(name, big), given[name]))


class Records:
    """A window of host records in wide form.

    Args:
        step: ``[n]`` step of each record.
        cid: ``[n]`` column of each record, an index into ``columns``.
        value: ``[n]`` float value.
        columns: ``(layer, kind, metric)`` of each column id.
        since: First step that is new in this evaluation; rules report only episodes that reach
            it (the steps before it are context).
        layers: Layer metadata.
        first_seen: First ``(step, value)`` recorded for each ``(layer, kind, metric)`` in the
            whole run (to tell "from the start" apart from "since step s" when the window no
            longer holds the start).
        context: What is known about the run besides its records (optimizers, normalisation,
            remedies in force, how it was started): advice is built from it.
    """

    def __init__(
        self,
        step: np.ndarray,
        cid: np.ndarray,
        value: np.ndarray,
        columns: list[tuple[str, str, str]],
        since: int,
        layers: LayerInfo,
        first_seen: dict[tuple[str, str, str], tuple[int, float]] | None = None,
        context: RunContext | None = None,
    ) -> None:
        self.since = since
        self.context = context or RunContext()
        self.layers = layers
        self.first_seen = first_seen or {}
        self.columns = columns
        self._step = step
        self._cid = cid
        self._value = value
        self._cache: dict[tuple[str, str], tuple[np.ndarray, list[str], np.ndarray]] = {}

    def wide(self, metric: str, kind: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(steps [T], layers [L], values [T, L])`` of one metric, rows only for steps where
        it was recorded on some layer, layers in forward order; NaN where not recorded."""
        key = (metric, kind)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ids = [i for i, (_, k, m) in enumerate(self.columns) if k == kind and m == metric]
        names = self.layers.ordered([self.columns[i][0] for i in ids])
        pos = np.full(len(self.columns) + 1, -1, dtype=np.int64)
        for i in ids:
            pos[i] = names.index(self.columns[i][0])
        sel = np.isin(self._cid, ids) if ids else np.zeros(self._cid.shape, dtype=bool)
        steps, row = np.unique(self._step[sel], return_inverse=True)
        out = np.full((steps.size, len(names)), np.nan)
        out[row, pos[self._cid[sel]]] = self._value[sel]  # last record of a cell wins
        hit = (steps, names, out)
        self._cache[key] = hit
        return hit

    def aligned(self, metric: str, kind: str, steps: np.ndarray, names: list[str]) -> np.ndarray:
        """``metric`` on the rows ``steps`` and columns ``names`` of another metric (NaN where
        it was not recorded)."""
        s2, n2, v2 = self.wide(metric, kind)
        out = np.full((steps.size, len(names)), np.nan)
        if not s2.size:
            return out
        rows = np.searchsorted(s2, steps)
        rows_ok = (rows < s2.size) & (s2[np.minimum(rows, s2.size - 1)] == steps)
        col_of = {name: i for i, name in enumerate(n2)}
        for j, name in enumerate(names):
            i = col_of.get(name)
            if i is not None:
                out[rows_ok, j] = v2[rows[rows_ok], i]
        return out


def keep_strongest(candidates: list[tuple[float, Episode]]) -> list[Episode]:
    """Episodes with their strength, strongest first. When several layers fire over the same
    steps (a bad batch moves every gradient), the Diagnoser groups them into one finding named
    after the strongest (the first here), with every layer in its ``layers``."""
    out: list[Episode] = []
    for strength, ep in sorted(candidates, key=lambda c: -c[0]):
        ep.strength = float(strength)
        out.append(ep)
    return out


def runs(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Index ranges ``[start, end]`` (inclusive) of consecutive True values at least
    ``min_len`` long."""
    out: list[tuple[int, int]] = []
    start = None
    for i, on in enumerate(mask.tolist()):
        if on and start is None:
            start = i
        elif not on and start is not None:
            if i - start >= min_len:
                out.append((start, i - 1))
            start = None
    if start is not None and mask.size - start >= min_len:
        out.append((start, mask.size - 1))
    return out


def trailing_stats(
    values: np.ndarray, window: int, min_obs: int, need: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row i of each column, robust statistics of the *finite* values among the
    ``window`` finite observations before i (i excluded): median, MAD and max.

    A non-finite value never enters anyone's history, so one NaN step cannot poison later
    verdicts (torch-surgeon's EMA turns one NaN into permanent false alarms; docs/comparison.md,
    "Other monitors").
    Missing observations (NaN) are skipped, not counted. Rows with fewer than ``min_obs``
    finite predecessors, and rows not in ``need`` (a boolean row mask; default all), get NaN.
    """
    t, n_cols = values.shape
    med = np.full((t, n_cols), np.nan)
    mad = np.full((t, n_cols), np.nan)
    top = np.full((t, n_cols), np.nan)
    rows_needed = np.ones(t, dtype=bool) if need is None else need
    for j in range(n_cols):
        col = values[:, j]
        finite_mask = np.isfinite(col)
        idx = np.flatnonzero(finite_mask)
        if idx.size < min_obs:
            continue
        finite = col[idx]
        targets = np.flatnonzero(rows_needed & ~np.isnan(col))  # observed rows (inf included)
        if not targets.size:
            continue
        k = np.searchsorted(idx, targets)  # finite predecessors of each target
        ok = k >= min_obs
        targets, k = targets[ok], k[ok]
        if not targets.size:
            continue
        full = k >= window
        if full.any():
            win = np.lib.stride_tricks.sliding_window_view(finite, window)[k[full] - window]
            m = np.median(win, axis=1)
            med[targets[full], j] = m
            mad[targets[full], j] = np.median(np.abs(win - m[:, None]), axis=1)
            top[targets[full], j] = win.max(axis=1)
        for i, kk in zip(targets[~full].tolist(), k[~full].tolist()):
            hist = finite[:kk]
            m0 = float(np.median(hist))
            med[i, j] = m0
            mad[i, j] = float(np.median(np.abs(hist - m0)))
            top[i, j] = float(hist.max())
    return med, mad, top


def fmt(x: float) -> str:
    """A number for a message: 3 significant digits."""
    if not np.isfinite(x):
        return str(x)
    return f"{x:.3g}"
