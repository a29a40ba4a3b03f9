"""Per-site sufficient statistics of :class:`~gradscope.probes.activations.ModuleProbe`.

A *site* is one module at one output width (see :mod:`gradscope.probes.activations`). This
module holds what the probe keeps per site between its hooks and the flush: the statistics of
one call (:class:`_Call`) and their pooling, the site itself (:class:`_Site`, with its output
gradient hook and its recent dead-unit masks), where an output's units lie, and the flush-time
derivation of the published metrics from the raw columns (:func:`complete`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..buffer import Chunk, StepBuffer
from ..guard import Guard
from ..hooks import Hook
from ..layers import Family
from . import numerics

KIND = "module"
COMPACT_AT = 64  # pool a site's per-call statistics once this many calls are pending
MASKS_KEPT = 3  # recycling: a unit is dead if dead in each of the last this many samples

_CHANNEL_FIRST = ("Convolution", "BatchNorm", "Pool", "GroupNorm", "InstanceNorm")

# Raw per-site columns, turned into the published metrics at flush time (see complete()).
_SUM, _L2, _PEAK, _SAT, _NF, _N, _UNITS, _ROWS = (
    "_sum",
    "_l2",
    "_dead",
    "_sat",
    "_nonfinite",
    "_n",
    "_units",
    "_rows",
)


def _unit_axis(out: torch.Tensor, args: tuple[Any, ...], compiling: bool) -> int | None:
    """Which axis holds the units: features of ``[B, F]``, channels of ``[B, C, H, W]``, the
    last axis of ``[B, T, D]`` unless it came from a convolution (``[B, C, L]``). None: no batch
    axis (a single example), every element is a unit."""
    ndim = out.dim()
    if ndim <= 1:
        return None
    if ndim == 2 or ndim >= 4:
        return 1
    if not compiling and args and isinstance(args[0], torch.Tensor):
        fn = args[0].grad_fn
        if fn is not None and any(tag in type(fn).__name__ for tag in _CHANNEL_FIRST):
            return 1
    return ndim - 1


def _softmax_dim(module: nn.Module, ndim: int) -> int:
    dim = getattr(module, "dim", None)
    if dim is None:  # nn.Softmax's legacy implicit dim
        dim = 0 if ndim in (0, 1, 3) else 1
    return int(dim) % max(ndim, 1)


class _Call:
    """Sufficient statistics of one call (or of several pooled calls) of a site."""

    __slots__ = ("l2", "n", "nonfinite", "peak", "rows", "sat", "sum")

    def __init__(
        self,
        n: int,
        s: torch.Tensor,
        l2: torch.Tensor,
        peak: torch.Tensor | None,
        sat: torch.Tensor | None,
        nonfinite: torch.Tensor | None,
        rows: int,
    ) -> None:
        self.n = n  # elements (host)
        self.sum = s  # 0-d float32
        self.l2 = l2  # 0-d float32: sqrt(sum of squares)
        self.peak = peak  # [units] per-unit max (or sum, for ReLU); None for bounded families
        self.sat = sat  # 0-d count of saturated elements / distributions
        self.nonfinite = nonfinite  # 0-d count, or None: proven 0 on the host
        self.rows = rows  # softmax distributions (host)


def _pool(calls: list[_Call]) -> _Call:
    """Merge calls into one (the common case, one call, costs nothing)."""
    if len(calls) == 1:
        return calls[0]
    peaks = [c.peak for c in calls if c.peak is not None]
    sats = [c.sat for c in calls if c.sat is not None]
    nfs = [c.nonfinite for c in calls if c.nonfinite is not None]
    return _Call(
        n=sum(c.n for c in calls),
        s=torch.stack([c.sum for c in calls]).sum(),
        l2=torch.linalg.vector_norm(torch.stack([c.l2 for c in calls])),
        peak=torch.stack(peaks).amax(0) if peaks else None,
        sat=torch.stack(sats).sum() if sats else None,
        nonfinite=torch.stack(nfs).sum() if nfs else None,
        rows=sum(c.rows for c in calls),
    )


class _Site:
    """Statistics of one module at one output width, pooled over the calls of a step."""

    __slots__ = (
        "axis",
        "buffer",
        "calls",
        "done",
        "family",
        "grad_done",
        "grad_hook",
        "grads",
        "groups",
        "masks",
        "name",
        "units",
        "whole_masks",
    )

    def __init__(
        self,
        name: str,
        family: Family | None,
        axis: int | None,
        buffer: StepBuffer,
        guard: Guard | None = None,
        signal: bool = True,
    ):
        self.name = name
        self.family = family
        self.axis = axis
        self.buffer = buffer
        self.calls: list[_Call] = []  # current window
        self.done: list[_Call] = []  # windows already closed in this step
        self.grads: list[torch.Tensor] = []  # norms of output gradients, current window
        self.grad_done: list[torch.Tensor] = []
        self.grad_hook = Hook(self._add_grad, f"output-grad {name}", guard, "output-grad")
        self.masks: list[torch.Tensor] | None = None  # recent per-unit dead masks (recycling)
        self.units: int | None = None
        self.whole_masks = False  # write the per-unit dead mask, not its count (distributed)
        metrics = ["output_grad_norm"] if signal else []  # functional sites: no backward signal
        if self.family is not None:
            first = (
                "act_dead_fraction"
                if self.family in (Family.RECTIFIER, Family.OTHER)
                else "act_saturation"
            )
            metrics += [first, "act_mean", "act_std", "act_nonfinite"]
        for metric in metrics:  # the published columns must exist for complete() to fill
            buffer.column(name, KIND, metric)
        self.groups = {
            raw: buffer.group(((name, KIND, raw),))
            for raw in (_SUM, _L2, _PEAK, _SAT, _NF, *(["output_grad_norm"] if signal else []))
        }

    def _add_grad(self, grad: torch.Tensor) -> None:
        self.grads.append(numerics.norm(grad))
        if len(self.grads) >= COMPACT_AT:
            self.grads[:] = [torch.linalg.vector_norm(torch.stack(self.grads))]

    def end_window(self) -> None:
        self.done.extend(self.calls)
        self.calls.clear()
        self.grad_done.extend(self.grads)
        self.grads.clear()
        if len(self.done) >= COMPACT_AT:
            self.done[:] = [_pool(self.done)]
        if len(self.grad_done) >= COMPACT_AT:
            self.grad_done[:] = [torch.linalg.vector_norm(torch.stack(self.grad_done))]

    def write(
        self, thr: float, into: dict[torch.device, tuple[list[int], list[torch.Tensor]]]
    ) -> None:
        """The step's raw statistics: 0-d tensors go into ``into`` (column, value, by device:
        the probe writes every site's in one stacked group), host values to the buffer."""
        buf = self.buffer

        def put(raw: str, value: torch.Tensor) -> None:
            cols, values = into.setdefault(value.device, ([], []))
            cols.append(self.groups[raw].cols[0])
            values.append(value)

        if self.done:
            c = _pool(self.done)
            put(_SUM, c.sum)
            put(_L2, c.l2)
            if c.peak is not None:
                dead = c.peak <= thr
                if self.whole_masks:  # the ranks' masks are combined at flush: dead on all
                    buf.write_vector(self.groups[_PEAK].cols[0], dead)
                else:
                    put(_PEAK, dead.sum())
                self.units = int(c.peak.numel())
                if self.masks is not None:  # [units] bools of a statistic, not an activation
                    self.masks = [*self.masks[-(MASKS_KEPT - 1) :], dead]
                buf.write_host(buf.column(self.name, KIND, _UNITS), float(c.peak.numel()))
            if c.sat is not None:
                put(_SAT, c.sat)
            if c.nonfinite is not None:
                put(_NF, c.nonfinite)
            else:
                buf.write_host(self.groups[_NF].cols[0], 0.0)
            buf.write_host(buf.column(self.name, KIND, _N), float(c.n))
            if c.rows:
                buf.write_host(buf.column(self.name, KIND, _ROWS), float(c.rows))
        if self.grad_done:
            norms = self.grad_done
            total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
            put("output_grad_norm", total)
        self.done.clear()
        self.grad_done.clear()

    def clear(self) -> None:
        self.calls.clear()
        self.done.clear()
        self.grads.clear()
        self.grad_done.clear()


def complete(chunk: Chunk) -> None:
    """At flush, on the host: the published metrics from the raw sufficient statistics.

    mean = sum / n; std = sqrt((l2^2 - sum^2 / n) / (n - 1)); dead fraction = dead units /
    units; saturation = saturated / n (softmax: / distributions); both fractions are NaN on
    a step whose outputs held NaN/Inf (undefined, not 0). Raw columns (named
    ``_...``) stay in the chunk for the rules; :meth:`LongTable.published` leaves them out
    of what the sinks see.
    """
    import numpy as np

    col_of = {key: i for i, key in enumerate(chunk.columns)}
    v, w = chunk.values, chunk.written
    for (r, c), mask in chunk.vectors.items():  # per-unit dead masks: count the dead
        if chunk.columns[c][2] == _PEAK:
            v[r, c] = float(np.count_nonzero(mask > 0.5))
            w[r, c] = True
    sites = {layer for layer, kind, metric in chunk.columns if kind == KIND and metric == _N}
    with np.errstate(divide="ignore", invalid="ignore"):
        for site in sites:

            def col(metric: str, site: str = site) -> int | None:
                return col_of.get((site, KIND, metric))

            n_col, sum_col, l2_col = col(_N), col(_SUM), col(_L2)
            if n_col is None or sum_col is None or l2_col is None:
                continue
            rows = w[:, n_col] & w[:, sum_col] & w[:, l2_col]
            n, s, l2 = v[:, n_col], v[:, sum_col], v[:, l2_col]
            var = (l2 * l2 - s * s / n) / np.maximum(n - 1, 1)
            derived = {  # metric -> (values, rows where they are defined)
                "act_mean": (s / n, rows),
                "act_std": (np.sqrt(np.maximum(var, 0.0)), rows),
            }
            nf_col = col(_NF)
            # a NaN output is neither dead nor saturated nor alive: where the step's
            # outputs held NaN/Inf, the fractions are NaN (never a reassuring 0)
            tainted = np.zeros(len(rows), dtype=bool)
            if nf_col is not None:
                derived["act_nonfinite"] = (v[:, nf_col], rows & w[:, nf_col])
                tainted = w[:, nf_col] & (v[:, nf_col] != 0)
            dead_col, units_col = col(_PEAK), col(_UNITS)
            if dead_col is not None and units_col is not None:
                dead = np.where(tainted, np.nan, v[:, dead_col] / v[:, units_col])
                derived["act_dead_fraction"] = (dead, rows & w[:, dead_col] & w[:, units_col])
            sat_col = col(_SAT)
            if sat_col is not None:
                rows_col = col(_ROWS)
                denom = n if rows_col is None else np.where(w[:, rows_col], v[:, rows_col], n)
                sat = np.where(tainted, np.nan, v[:, sat_col] / denom)
                derived["act_saturation"] = (sat, rows & w[:, sat_col])
            for metric, (values, ok) in derived.items():
                target = col(metric)
                if target is not None:
                    v[ok, target] = values[ok]
                    w[ok, target] = True
