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

from collections.abc import Sequence

import torch

from ..buffer import Chunk, StepBuffer
from ..layers import ParamSlot
from .grads import KIND, ParamGroups, fp32_norms

TINY = 1e-12  # ||w|| at or below this: the ratio is undefined, not reported


class WeightProbe:
    """Snapshot before an update, ratios after it."""

    def __init__(self, buffer: StepBuffer, update_ratio: bool = True) -> None:
        self.buffer = buffer
        self.update_ratio = update_ratio
        self._snap: dict[int, torch.Tensor] = {}  # slot index -> persistent copy of the weights
        self._pending: dict[int, ParamSlot] = {}  # snapshotted this step, waiting for update()
        self._before: torch.Tensor | None = None  # [k] norms of the snapshotted weights
        self._group = ParamGroups(buffer)

    def snapshot(self, slots: Sequence[ParamSlot]) -> None:
        """Record ``weight_norm`` now and, if update ratios are on, keep a copy of the weights."""
        slots = [s for s in slots if s.param.grad is not None and s.index not in self._pending]
        if not slots:
            return
        params = [s.param.detach() for s in slots]
        norms = fp32_norms(params)  # [k]
        self.buffer.write(self._group(slots, "weight_norm"), norms)
        if not self.update_ratio:
            return
        copies = [self._copy_for(s) for s in slots]
        torch._foreach_copy_(copies, params)
        for s in slots:
            self._pending[s.index] = s
        self._before = norms if self._before is None else torch.cat([self._before, norms])

    def _copy_for(self, slot: ParamSlot) -> torch.Tensor:
        p = slot.param
        snap = self._snap.get(slot.index)
        if snap is None or (snap.shape, snap.dtype, snap.device) != (p.shape, p.dtype, p.device):
            snap = self._snap[slot.index] = torch.empty_like(p, memory_format=torch.preserve_format)
        return snap

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def update(self) -> None:
        """After the update: ``update_ratio = ||w_before - w_after|| / ||w_before||``."""
        if not self._pending or self._before is None:
            return
        slots = list(self._pending.values())
        snaps = [self._snap[s.index] for s in slots]
        torch._foreach_sub_(snaps, [s.param.detach() for s in slots])  # snaps := w_before - w
        delta = fp32_norms(snaps)  # [k]
        before = self._before
        ratio = torch.where(before > TINY, delta / before.clamp_min(TINY), torch.nan)
        self.buffer.write(self._group(slots, "update_ratio"), ratio)
        self._pending.clear()
        self._before = None

    def cancel(self) -> None:
        """The step did not update the weights (e.g. skipped): drop the pending snapshot."""
        self._pending.clear()
        self._before = None

    @staticmethod
    def complete(chunk: Chunk) -> None:
        """At flush: an undefined ratio (``||w||`` ~ 0, or non-finite weights, which
        ``weight_norm`` already shows) is left out rather than stored as NaN."""
        import numpy as np

        cols = [i for i, (_, kind, metric) in enumerate(chunk.columns)
                if kind == KIND and metric == "update_ratio"]
        if cols:
            idx = np.array(cols)
            chunk.written[:, idx] &= np.isfinite(chunk.values[:, idx])

    def release(self) -> None:
        self._snap.clear()
        self.cancel()
