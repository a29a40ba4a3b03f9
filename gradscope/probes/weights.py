"""Weight norms and update-to-weight ratios ``||Δw|| / ||w||``, on sampled steps.

The update ratio is the single best "is the learning rate sane" signal (about 1e-3 is healthy).
It needs the weights before and after the update: :meth:`WeightProbe.snapshot` copies them into
persistent buffers (``_foreach_copy_``; allocated once, reused, because a fresh clone per step was
measured at ~1.7x the cost) and :meth:`WeightProbe.update` subtracts in place and takes norms.

``weight_norm`` is the norm the update is divided by: the weights as the step found them. The
ratio is left out (not reported as inf) where that norm is ~0, e.g. zero-initialised biases.
Memory: one copy of the watched parameters (``Config.update_ratio=False`` saves it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..buffer import Chunk, StepBuffer
from ..layers import ParamSlot
from . import numerics
from .grads import KIND, ParamGroups

TINY = 1e-12  # ||w|| at or below this: the ratio is undefined, not reported
DELTA = "_delta_norm"  # raw: ||w_before - w_after||, turned into update_ratio at flush


class WeightProbe:
    """Snapshot before an update, ratios after it."""

    def __init__(
        self, buffer: StepBuffer, update_ratio: bool = True, count_on_host: bool = False
    ) -> None:
        self.buffer = buffer
        self.update_ratio = update_ratio
        # where reading a flag is free (the CPU): a weight_norm that is not finite is checked
        # element by element, so an overflowing norm of huge finite weights is not taken for a
        # NaN/Inf (weight_nonfinite: exact counts, on those steps only)
        self.count_on_host = count_on_host
        self._snap: dict[int, torch.Tensor] = {}  # slot index -> persistent copy of the weights
        self._pending: dict[int, ParamSlot] = {}  # snapshotted this step, waiting for update()
        self._group = ParamGroups(buffer)

    def snapshot(self, slots: Sequence[ParamSlot]) -> None:
        """Record ``weight_norm`` now and, if update ratios are on, keep a copy of the weights."""
        pairs = [
            (s, s.local_weight())
            for s in slots
            if s.param.grad is not None and s.index not in self._pending
        ]
        # an FSDP rank may hold no part of a parameter: nothing of it to measure here
        pairs = [(s, w) for s, w in pairs if w.numel() or not (s.dtensor or s.span)]
        if not pairs:
            return
        slots = [s for s, _ in pairs]
        params = [w for _, w in pairs]
        norms = numerics.norms(params)  # [k]
        self.buffer.write(self._group(slots, "weight_norm"), norms)
        if self.count_on_host and not math.isfinite(norms.sum().item()):
            counts = numerics.nonfinite_counts(params)
            self.buffer.write(self._group(slots, "weight_nonfinite"), counts)
        if not self.update_ratio:
            return
        copies = [self._copy_for(s.index, w) for s, w in pairs]
        torch._foreach_copy_(copies, params)
        for s in slots:
            self._pending[s.index] = s

    def _copy_for(self, index: int, p: torch.Tensor) -> torch.Tensor:
        snap = self._snap.get(index)
        if snap is None or (snap.shape, snap.dtype, snap.device) != (p.shape, p.dtype, p.device):
            snap = self._snap[index] = torch.empty_like(p, memory_format=torch.preserve_format)
        return snap

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def update(self) -> None:
        """After the update: ``update_ratio = ||w_before - w_after|| / ||w_before||``."""
        if not self._pending:
            return
        slots = list(self._pending.values())
        snaps = [self._snap[s.index] for s in slots]
        torch._foreach_sub_(snaps, [s.local_weight() for s in slots])  # w_before - w
        # ||Δw||: the ratio to weight_norm is taken on the host at flush (complete()), after
        # the norms of sharded parameters are combined across ranks
        self._group(slots, "update_ratio")  # the column complete() fills (created once)
        self.buffer.write(self._group(slots, DELTA), numerics.norms(snaps))
        self._pending.clear()

    def cancel(self) -> None:
        """The step did not update the weights (e.g. skipped): drop the pending snapshot."""
        self._pending.clear()

    @staticmethod
    def complete(chunk: Chunk) -> None:
        """At flush: ``update_ratio = ||Δw|| / weight_norm``. An undefined ratio (``||w||`` ~ 0,
        or non-finite weights, which ``weight_norm`` already shows) is left out rather than
        stored as NaN."""
        import numpy as np

        col_of = {key: i for i, key in enumerate(chunk.columns)}
        v, w = chunk.values, chunk.written
        for (layer, kind, metric), d in col_of.items():
            if kind != KIND or metric != DELTA:
                continue
            n = col_of.get((layer, kind, "weight_norm"))
            r = col_of.get((layer, kind, "update_ratio"))
            if n is None or r is None:
                continue
            ok = w[:, d] & w[:, n] & (v[:, n] > TINY)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = v[:, d] / v[:, n]
            ok &= np.isfinite(ratio)
            v[ok, r] = ratio[ok]
            w[ok, r] = True

    def release(self) -> None:
        self._snap.clear()
        self.cancel()
