"""Reductions that accept every dtype a model can hold, accumulated in at least float32.

A monitor meets float64 models (``model.double()``), bfloat16 and float16 ones, models that mix
them, complex parameters and sparse gradients. torch's reductions differ per dtype in ways that
raise: ``vector_norm(x, dtype=torch.float32)`` refuses a float64 input (narrowing) and a complex
one (a complex input wants a complex dtype), ``aminmax`` refuses complex tensors. So every
statistic goes through these helpers:

* float16/bfloat16 (and complex32) are accumulated in float32 (a norm accumulated in float16
  overflows at 65504);
* float32, float64 and complex tensors are reduced in their own precision (a float64 statistic
  stays float64 up to the host, see :meth:`gradscope.buffer.StepBuffer.take`); a complex tensor's
  norm is the norm of its moduli, its peak the largest modulus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOW = (torch.float16, torch.bfloat16)
"""Dtypes accumulated in float32."""


def accumulate_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The ``dtype=`` for a sum or norm of ``t``: float32 for half precision, else None (the
    tensor's own precision)."""
    return torch.float32 if t.dtype in LOW else None


def _widened(t: torch.Tensor) -> torch.Tensor:
    """complex32 has few kernels: reduce it as complex64."""
    return t.to(torch.complex64) if t.dtype == torch.complex32 else t


def norm(t: torch.Tensor) -> torch.Tensor:
    """0-d L2 norm of ``t`` (real: float32 or float64), without a host read."""
    if t.requires_grad:  # (a detach costs a tensor allocation: only where it serves)
        t = t.detach()
    t = _widened(t)
    out: torch.Tensor = torch.linalg.vector_norm(t, dtype=accumulate_dtype(t))
    return out


def total(t: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of a real tensor, accumulated in at least float32."""
    dtype = accumulate_dtype(t)
    if dim is None:
        return t.sum(dtype=dtype)
    return t.sum(dim=dim, dtype=dtype)


def _foreach_norm_supports_dtype() -> bool:
    try:
        torch._foreach_norm([torch.zeros(1, dtype=torch.float16)], 2, dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


_NORM_DTYPE_OK: bool | None = None


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[k]`` L2 norm of each tensor (see the module docstring for dtypes), float32, or
    float64 when any tensor is float64/complex128.

    One ``_foreach_norm`` per precision class (on accelerators a multi-tensor kernel: one
    launch instead of k; on the CPU within noise of a loop of ``vector_norm``, both at the
    memory-bandwidth floor of reading the tensors once).
    """
    global _NORM_DTYPE_OK
    tensors = [_widened(t) for t in tensors]
    low = [i for i, t in enumerate(tensors) if t.dtype in LOW]
    if not low:
        return torch.stack(torch._foreach_norm(tensors))
    if _NORM_DTYPE_OK is None:
        _NORM_DTYPE_OK = _foreach_norm_supports_dtype()
    low_tensors = [tensors[i] for i in low]
    if _NORM_DTYPE_OK:
        low_norms = list(torch._foreach_norm(low_tensors, 2, dtype=torch.float32))
    else:
        low_norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in low_tensors]
    if len(low) == len(tensors):
        return torch.stack(low_norms)
    rest = [i for i in range(len(tensors)) if i not in set(low)]
    out: list[torch.Tensor] = [low_norms[0]] * len(tensors)
    for i, n in zip(low, low_norms):
        out[i] = n
    for i, n in zip(rest, torch._foreach_norm([tensors[i] for i in rest])):
        out[i] = n
    return torch.stack(out)  # type promotion: float64 if any norm is


SMALL = 1 << 12
"""Tensors of at most this many elements get their maximum in one multi-tensor call: for many
small tensors the per-call cost, not the bytes, is what a loop pays (1,002 tensors of 16x16 on
one CPU thread: 6.9 ms as a loop of ``aminmax``, 2.1 ms as one ``_foreach_norm(inf)``; for the
MLP's 8 large ones the loop is 15x faster)."""


def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[k]`` largest absolute value (modulus) of each tensor (``aminmax``: one pass, no
    ``abs`` copy, for real tensors; small real tensors together in one ``_foreach_norm`` of
    order inf, the same exact maximum)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    small = [
        i
        for i, t in enumerate(tensors)
        if 0 < t.numel() <= SMALL and not t.is_complex() and t.dtype != torch.float64
    ]
    if len(small) > 1:
        peaks = torch._foreach_norm([tensors[i].detach() for i in small], math.inf)
        for i, peak in zip(small, peaks):
            out[i] = peak.float()
    for i, t in enumerate(tensors):
        if out[i] is not None:
            continue
        t = t.detach()
        if not t.numel():  # an empty parameter: no peak (0 is what a MAX over parts ignores)
            out[i] = torch.zeros((), dtype=torch.float32, device=t.device)
            continue
        if t.is_complex():
            out[i] = _widened(t).abs().max()
            continue
        lo, hi = torch.aminmax(t.reshape(-1))
        peak = torch.maximum(hi, -lo)
        out[i] = peak if peak.dtype == torch.float64 else peak.float()
    return torch.stack(out)  # type: ignore[arg-type]


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[k]`` number of NaN/Inf elements of each tensor (expensive: flagged steps only)."""
    return torch.stack([torch.logical_not(torch.isfinite(t)).sum() for t in tensors]).float()
