"""Per-parameter gradient statistics, read from ``p.grad`` when the optimizer is about to step.

Read there (not in per-parameter tensor hooks) because only then are the gradients final:
accumulated over micro-batches, all-reduced by DDP, and unscaled by a (non-fused) GradScaler.
Fused optimizers under a GradScaler still hold scaled gradients at that point; the caller passes
the optimizer's ``grad_scale`` and the norms are divided by it on the device.

Cost model (docs/costs.md, "Gradient statistics"; re-measured in benchmarks/): one
``torch._foreach_norm`` over all gradients is at the memory-bandwidth floor. Maximum absolute
values cost about twice a norm on CPU (``aminmax`` per tensor, the cheapest kernel measured), so
they are taken on sampled steps only. Exact non-finite counts cost 10-20 norms, so they are taken
only on steps whose norms are non-finite: a finite sum of squares proves every element finite, so
every other step's count is exactly 0 and is filled in on the host at flush time
(:meth:`GradProbe.complete`).
Histograms (``Config.histograms``, off by default) are taken on sampled steps only, one
``histc`` pass per gradient (see :func:`grad_histograms`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..buffer import Chunk, Group, StepBuffer
from ..layers import ParamSlot
from ..records import RUN_LAYER
from . import numerics

KIND = "param"


_WIDE = (torch.float32, torch.float64)
HIST_BINS = 30
HIST_METRICS = ("_hist_min", "_hist_max", *(f"_hist_{i}" for i in range(HIST_BINS)))
"""Raw columns of one gradient's histogram: its min, its max, and the counts of ``HIST_BINS``
equal-width bins between them. Raw (``_``): not in the Parquet store, only TensorBoard reads
them."""
_HIST_CHUNK = 1 << 24  # elements binned at once off the CPU (bounds the float32 temporary)


def grad_histograms(tensors: Sequence[torch.Tensor], bins: int = HIST_BINS) -> torch.Tensor:
    """``[k, bins + 2]``: each tensor's min, max and the counts of ``bins`` equal-width bins
    from min to max (the max falls in the last bin), in float32.

    No host read off the CPU: the values are mapped to ``[0, bins]`` on the device and counted
    with ``histc`` over that fixed range. On the CPU, where reading the range is free, ``histc``
    bins the gradient directly (one pass). A tensor holding NaN/Inf has a non-finite min or max
    and counts that mean nothing (TensorBoard leaves it out: ``grad_nonfinite`` counts those).
    All-equal values count in the first bin. Counts are exact up to 2**24 per bin (float32).
    """
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.is_complex():  # the moduli: a histogram orders real values
            flat = flat.abs()
        if flat.dtype not in _WIDE:
            flat = flat.float()
        lo, hi = torch.aminmax(flat)
        if flat.device.type == "cpu":
            a, b = float(lo), float(hi)
            if not (math.isfinite(a) and math.isfinite(b)):
                counts = torch.zeros(bins, dtype=flat.dtype)
            elif a == b:
                counts = torch.zeros(bins, dtype=flat.dtype)
                counts[0] = flat.numel()
            else:
                counts = torch.histc(flat, bins=bins, min=a, max=b)
        else:
            scale = bins / (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
            counts = torch.zeros(bins, dtype=flat.dtype, device=flat.device)
            for part in torch.split(flat, _HIST_CHUNK):
                counts += fixed_range_counts((part - lo).mul_(scale).clamp_(0, bins), bins)
        rows.append(torch.cat([lo.reshape(1), hi.reshape(1), counts]).float())
    return torch.stack(rows)


def fixed_range_counts(v: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``v`` (values in ``[0, bins]``, NaN ignored) in the unit bins ``[i, i + 1)``.
    CUDA's ``histc`` has no deterministic kernel: under ``torch.use_deterministic_algorithms``
    the counts come from an accumulating ``index_put_`` (deterministic, slower)."""
    if not torch.are_deterministic_algorithms_enabled():
        return torch.histc(v, bins=bins, min=0, max=bins)
    idx = v.clamp(max=bins - 1).nan_to_num_(nan=bins).long()  # NaN -> an extra, dropped bin
    ones = torch.ones((), dtype=v.dtype, device=v.device).expand(idx.numel())
    out = torch.zeros(bins + 1, dtype=v.dtype, device=v.device)
    return out.index_put_((idx,), ones, accumulate=True)[:bins]


def _gather(slots: Sequence[ParamSlot]) -> tuple[list[ParamSlot], list[torch.Tensor]]:
    """The slots that have a gradient now, and those gradients (a sparse one's values;
    detached from a ``create_graph=True`` graph)."""
    present: list[ParamSlot] = []
    grads: list[torch.Tensor] = []
    for slot in slots:
        g = slot.param.grad
        if g is None:
            continue
        if slot.dtensor or slot.span is not None:  # FSDP: this rank's part
            g = slot.local_grad()
            if g is None or not g.numel():
                continue  # no part of this parameter on this rank
        if g.is_sparse:
            g = g.coalesce()._values()
        elif g.requires_grad:  # only under create_graph=True: keep out of the graph
            g = g.detach()
        present.append(slot)
        grads.append(g)
    return present, grads


class ParamGroups:
    """Buffer groups of one metric (or several per parameter, in order) over a set of
    parameters, cached by the set."""

    def __init__(self, buffer: StepBuffer) -> None:
        self.buffer = buffer
        self._groups: dict[tuple[tuple[int, ...], str | tuple[str, ...]], Group] = {}

    def __call__(self, slots: Sequence[ParamSlot], metric: str | tuple[str, ...]) -> Group:
        key = (tuple(s.index for s in slots), metric)
        grp = self._groups.get(key)
        if grp is None:
            metrics = (metric,) if isinstance(metric, str) else metric
            keys = tuple((s.name, KIND, m) for s in slots for m in metrics)
            grp = self._groups[key] = self.buffer.group(keys)
        return grp


class GradProbe:
    """Writes ``grad_norm``/``grad_max_abs``/``grad_nonfinite`` per parameter and
    ``grad_norm_total`` per step into the buffer.

    Args:
        buffer: Where the statistics go.
        count_policy: ``"host"``: read the step's non-finite flag on the host and count exactly
            when it is set (free where tensors live on the CPU: there is no device to wait for).
            ``"armed"``: count on every step (set while non-finite values were recently seen on
            an accelerator). ``"flagged-only"``: never read the flag; counts come only from steps
            known to be non-finite (GradScaler-skipped steps) or while armed.
    """

    def __init__(
        self, buffer: StepBuffer, count_policy: str = "host", histograms: bool = False
    ) -> None:
        self.buffer = buffer
        self.count_policy = count_policy
        self.histograms = histograms  # gradient histograms on sampled steps (TensorBoard)
        self.on_nonfinite: Callable[[], None] | None = None  # a step had NaN/Inf gradients
        self.param_groups = ParamGroups(buffer)
        buffer.column(RUN_LAYER, "run", "grad_norm_total")  # filled in at flush, see complete()

    def _group(self, slots: Sequence[ParamSlot], metric: str) -> Group:
        if metric == "grad_norm":  # counts are derived from norms at flush: need the columns
            self.param_groups(slots, "grad_nonfinite")
        return self.param_groups(slots, metric)

    def record(
        self,
        slots: Sequence[ParamSlot],
        sampled: bool,
        grad_scale: torch.Tensor | float | None = None,
        known_nonfinite: bool = False,
        scaled: bool = False,
    ) -> tuple[list[ParamSlot], list[torch.Tensor], torch.Tensor] | None:
        """Measure the current gradients of ``slots`` (no host read, except under ``"host"``).

        Parameters whose ``.grad`` is None (unused this step, frozen) are skipped. ``scaled``:
        the gradients still carry a GradScaler's loss scale (a non-finite value is then the
        scaler's business, not a flag for the tracer). Returns the measured slots, the tensors
        measured (a sparse gradient's values) and their fp32 norms (divided by ``grad_scale``),
        for the remedies; None when no slot had a gradient.
        """
        present, grads = _gather(slots)
        if not grads:
            return None
        norms = numerics.norms(grads)  # [k]
        if grad_scale is not None:
            norms = norms / grad_scale
        self.buffer.write(self._group(present, "grad_norm"), norms)
        if sampled:
            if self.histograms:
                hist = grad_histograms(grads)  # [k, 2 + bins]: min, max, counts
                if grad_scale is not None:
                    hist[:, :2] /= grad_scale
                self.buffer.write(self.param_groups(present, HIST_METRICS), hist)
                peaks = torch.maximum(hist[:, 1], -hist[:, 0])
            else:
                peaks = numerics.max_abs(grads)
                if grad_scale is not None:
                    peaks = peaks / grad_scale
            self.buffer.write(self._group(present, "grad_max_abs"), peaks)
        count = known_nonfinite or self.count_policy == "armed"
        if not count and self.count_policy == "host":
            # One read of a CPU scalar (there is no device to wait for). A norm is finite iff
            # every element is, and a sum of non-negative norms iff every norm is (an overflow
            # of huge finite values is a false alarm that the exact count then clears).
            count = not math.isfinite(norms.sum().item())
        if count:
            counts = numerics.nonfinite_counts(grads)
            self.buffer.write(self._group(present, "grad_nonfinite"), counts)
            # A GradScaler-skipped step (known_nonfinite) is the scaler doing its job (an fp16
            # overflow at too high a scale): it does not arm the tracer.
            # Nor do gradients still multiplied by a loss scale (read at the end of a scaled
            # backward pass, before GradScaler unscaled them): they overflow by design.
            if (
                self.on_nonfinite is not None
                and not known_nonfinite
                and not scaled
                and (self.count_policy != "host" or counts.sum().item() > 0)
            ):
                self.on_nonfinite()
        return present, grads, norms

    def record_clipped(
        self, slots: Sequence[ParamSlot], grad_scale: torch.Tensor | float | None = None
    ) -> tuple[list[ParamSlot], list[torch.Tensor], torch.Tensor] | None:
        """Norms of gradients the script has clipped itself (``clip_grad_norm_`` between
        ``backward()`` and ``step()``): their pre-clip statistics were recorded when the clip
        was called; these are the norms after it, as ``grad_norm_clipped``."""
        present, grads = _gather(slots)
        if not grads:
            return None
        norms = numerics.norms(grads)
        if grad_scale is not None:
            norms = norms / grad_scale
        self.buffer.write(self.param_groups(present, "grad_norm_clipped"), norms)
        return present, grads, norms

    def complete(self, chunk: Chunk) -> None:
        """At flush, on the host: ``grad_norm_total`` of each step from its parameter norms
        (``sqrt(sum ||g_p||^2)``, as ``clip_grad_norm_`` computes it), and the non-finite
        counts that a finite norm proves to be zero. Where the flag is not read per step
        (accelerators), a non-finite norm in this chunk arms exact counting until a clean one."""
        import numpy as np

        col_of = {key: i for i, key in enumerate(chunk.columns)}
        norm_all = [
            i for i, (_, kind, m) in enumerate(chunk.columns) if kind == KIND and m == "grad_norm"
        ]
        total_col = col_of.get((RUN_LAYER, "run", "grad_norm_total"))
        if norm_all:
            w = chunk.written[:, norm_all]
            if self.count_policy != "host":
                rows_bad = (w & ~np.isfinite(chunk.values[:, norm_all])).any(axis=1)
                self.count_policy = "armed" if rows_bad.any() else "flagged-only"
                skip_col = col_of.get((RUN_LAYER, "run", "skipped_step"))
                if skip_col is not None:  # GradScaler skips are expected, not a reason to trace
                    rows_bad &= ~(chunk.written[:, skip_col] & (chunk.values[:, skip_col] > 0))
                if rows_bad.any() and self.on_nonfinite is not None:
                    self.on_nonfinite()
            if total_col is not None:
                sq = np.where(w, chunk.values[:, norm_all], 0.0) ** 2
                has = w.any(axis=1)
                chunk.values[has, total_col] = np.sqrt(sq.sum(axis=1))[has]
                chunk.written[has, total_col] = True
        self._complete_clipped(chunk, col_of)
        pairs = [
            (i, col_of[(layer, kind, "grad_nonfinite")])
            for i, (layer, kind, metric) in enumerate(chunk.columns)
            if kind == KIND and metric == "grad_norm" and (layer, kind, "grad_nonfinite") in col_of
        ]
        if not pairs:
            return
        norm_cols = np.array([p[0] for p in pairs])
        count_cols = np.array([p[1] for p in pairs])
        fill = (
            chunk.written[:, norm_cols]
            & ~chunk.written[:, count_cols]
            & np.isfinite(chunk.values[:, norm_cols])
        )
        chunk.values[:, count_cols] = np.where(fill, 0.0, chunk.values[:, count_cols])
        chunk.written[:, count_cols] |= fill

    @staticmethod
    def _complete_clipped(chunk: Chunk, col_of: dict[tuple[str, str, str], int]) -> None:
        """Steps where the script clipped its own gradients (``grad_norm_clipped`` recorded
        outside gradscope's clipping): the run-level norm after the clip and the coefficient
        (``clip_coef`` = after / before), from the per-parameter norms. A parameter the clip
        did not touch counts with its unclipped norm."""
        import numpy as np

        total_col = col_of.get((RUN_LAYER, "run", "grad_norm_total_clipped"))
        coef_col = col_of.get((RUN_LAYER, "run", "clip_coef"))
        before_col = col_of.get((RUN_LAYER, "run", "grad_norm_total"))
        if total_col is None or before_col is None:
            return
        norm_cols, clipped_cols = [], []
        for (layer, kind, metric), i in col_of.items():
            if kind == KIND and metric == "grad_norm":
                norm_cols.append(i)
                clipped_cols.append(col_of.get((layer, kind, "grad_norm_clipped"), -1))
        if not any(c >= 0 for c in clipped_cols):
            return
        w = chunk.written
        has_clip = np.zeros(len(chunk.steps), dtype=bool)
        sq = np.zeros(len(chunk.steps))
        for n, c in zip(norm_cols, clipped_cols):
            norm = np.where(w[:, n], chunk.values[:, n], 0.0)
            if c >= 0:
                has_clip |= w[:, c]
                norm = np.where(w[:, c], chunk.values[:, c], norm)
            sq += norm**2
        fill = has_clip & ~w[:, total_col]  # gradscope's own clipping wrote its totals itself
        if not fill.any():
            return
        total = np.sqrt(sq)
        chunk.values[fill, total_col] = total[fill]
        w[fill, total_col] = True
        if coef_col is not None:
            before = chunk.values[:, before_col]
            ok = fill & ~w[:, coef_col] & w[:, before_col] & (before > 0)
            chunk.values[ok, coef_col] = total[ok] / before[ok]
            w[ok, coef_col] = True
