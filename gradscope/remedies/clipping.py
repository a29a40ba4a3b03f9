"""Gradient clipping right before the optimizer step: fixed norm, AutoClip, AGC and ZClip.

Everything here runs on the gradients' device with no host read: thresholds and coefficients
are tensors, and a "no clipping" decision is a coefficient of exactly 1 (``g * 1.0 == g``), the
way ``clip_grad_norm_`` avoids its ``if`` (docs/remedies.md, "Clipping"). The statistics are
taken before clipping (``grad_norm`` is the pre-clip norm); the clipper returns the post-clip norms
and coefficients for the records.

A non-finite step (an inf/NaN norm) is never clipped (its gradients are left as they are, so
the non-finite finding and the tracer see the real values; ``guard=True`` is the remedy for
it) and never enters a clipper's history: the AutoClip and ZClip packages both let one NaN
step poison every later threshold (docs/remedies.md, "Non-finite steps never enter a
history").

Global clipping treats all the optimizer's gradients as one vector (``clip_grad_norm_``);
``per_layer`` treats each parameter tensor on its own, with its own history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..probes.numerics import accumulate_dtype
from .spec import ClipSpec

EPS = 1e-6  # clip_grad_norm_'s: coef = max / (norm + 1e-6)


@dataclass
class ClipResult:
    """What one clipping did, as device tensors (for the records).

    ``post``: post-clip norm of each measured gradient (in the order given); ``coef``: per
    tensor, post/pre; ``total_pre``/``total_post``: norms of all the optimizer's gradients;
    ``threshold``: the global threshold (0-d) or, per layer, one per measured tensor.
    """

    post: torch.Tensor
    coef: torch.Tensor
    total_pre: torch.Tensor
    total_post: torch.Tensor
    threshold: torch.Tensor | None
    slots: list[Any] = field(default_factory=list)  # set by Remedies: the measured ParamSlots


def to_device_index(keys: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long index tensor on ``device`` without a synchronising copy (pinned, non-blocking on
    CUDA)."""
    host = torch.tensor(list(keys), dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _coef(threshold: torch.Tensor | float, norm: torch.Tensor) -> torch.Tensor:
    """``clamp(threshold / (norm + 1e-6), max=1)``; exactly 1 where the norm is non-finite or
    the threshold is infinite (no clipping). A fixed threshold stays a Python float: torch
    computes ``float / tensor`` as ``tensor.reciprocal() * float``, and ``clip_grad_norm_``'s
    coefficient is that expression, bit for bit."""
    coef = torch.clamp(threshold / (norm + EPS), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


class Clipper:
    """Clipping state of one optimizer. Subclasses give the threshold rule."""

    def __init__(self, spec: ClipSpec, size: int = 1) -> None:
        self.spec = spec
        self.size = size  # rows of state: 1 global, or one per parameter tensor
        self.per_layer = spec.per_layer
        self.fixed: float | None = None  # a constant threshold (NormClip)
        self.boundary: torch.Tensor | None = None  # what to record as the threshold, if not it
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # -- the rule ---------------------------------------------------------------------------
    def threshold(self, norm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Thresholds ``[G]`` for norms ``[G]`` (``rows``: which state rows, per layer), and
        update the state. ``inf`` means no clipping."""
        raise NotImplementedError

    # -- checkpointing ------------------------------------------------------------------------
    _STATE: tuple[str, ...] = ()  # tensor attributes that hold the rule's state

    def state_dict(self) -> dict[str, object]:
        """The rule's state (histories, EMAs), on the CPU; empty for stateless rules."""
        out: dict[str, object] = {}
        for name in self._STATE:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().clone()
            elif isinstance(value, tuple):
                value = tuple(v.detach().cpu().clone() for v in value)
            out[name] = value
        return out

    def load_state_dict(self, state: dict[str, object]) -> str | None:
        """Restore :meth:`state_dict`'s output; returns why not, or None when restored."""
        if set(state) != set(self._STATE):
            return f"expected state {sorted(self._STATE)}, got {sorted(state)}"
        rows = self.size
        for name, value in state.items():
            tensors = value if isinstance(value, tuple) else (value,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.shape[0] != rows:
                    return f"{name} holds {t.shape[0]} rows, this optimizer needs {rows}"
        for name, value in state.items():
            setattr(self, name, value)  # moved to the gradients' device at the next step
        return None

    # -- applying it ------------------------------------------------------------------------
    def clip(
        self,
        grads: Sequence[torch.Tensor],
        norms: torch.Tensor,
        measured: int,
        keys: tuple[int, ...],
    ) -> ClipResult:
        """Clip ``grads`` in place. ``norms[i]`` is the fp32 norm of ``grads[i]``; the first
        ``measured`` are the watched ones (recorded); ``keys`` identify the tensors for per-layer
        state (stable across steps)."""
        total_pre = torch.linalg.vector_norm(norms)
        if self.per_layer:
            rows = self._rows(keys, norms.device)
            thr = self.threshold(norms, rows)
            coef = _coef(self.fixed if self.fixed is not None else thr, norms)
            torch._foreach_mul_(list(grads), list(coef.to(grads[0].dtype).unbind()))
            post = norms * coef
            total_post = torch.linalg.vector_norm(post)
            shown = self.boundary if self.boundary is not None else thr
            return ClipResult(
                post[:measured], coef[:measured], total_pre, total_post, shown[:measured]
            )
        thr = self.threshold(total_pre.reshape(1), None)[0]
        coef = _coef(self.fixed if self.fixed is not None else thr, total_pre)
        torch._foreach_mul_(list(grads), coef)
        post = norms * coef
        shown = self.boundary[0] if self.boundary is not None else thr
        return ClipResult(
            post[:measured], coef.expand(measured), total_pre, total_pre * coef, shown
        )

    def _rows(self, keys: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """State rows of these tensors: None when they are all of them, in order (the usual
        case), else a cached index tensor (copied once per distinct set of tensors)."""
        if keys == tuple(range(len(keys))) and len(keys) == self.size:
            return None
        return self._cached_index(keys, device)

    def _cached_index(self, keys: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``keys`` as a long tensor on ``device``, copied once per distinct tuple."""
        index = self._index_cache.get(keys)
        if index is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            index = self._index_cache[keys] = to_device_index(keys, device)
        return index


class NormClip(Clipper):
    """``clip_grad_norm_(params, max)``: the same coefficient, bit for bit."""

    def __init__(self, spec: ClipSpec, size: int = 1) -> None:
        super().__init__(spec, size)
        self.fixed = float(spec["max"])

    def threshold(self, norm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return torch.full_like(norm, float(self.spec["max"]))


class AutoClip(Clipper):
    """Seetharaman et al. 2020, Algorithm 1: append the current norm to the history, clip to
    the history's p-th percentile (linear interpolation, as ``np.percentile``).

    The history is kept sorted on the device (``+inf`` padding past the count): inserting a
    norm is one ``searchsorted`` and one shift, O(H) elementwise with no sort and no host
    read. ``history=0`` (default) keeps every finite norm seen, as the paper does (capacity
    doubles, decided on the host from the call count); ``history=N`` keeps the last N.
    """

    def __init__(self, spec: ClipSpec, size: int) -> None:
        super().__init__(spec, size)
        self.window = int(spec["history"])
        self.q = float(spec["p"]) / 100.0
        self.sorted: torch.Tensor | None = None  # [G, C]
        self.count: torch.Tensor | None = None  # [G] int64: finite norms held
        self.ring: torch.Tensor | None = None  # [G, W] windowed: insertion order
        self.calls = 0

    _STATE = ("sorted", "count", "ring", "calls")

    def _state(self, device: torch.device) -> None:
        if self.sorted is None:
            cap = self.window or 64
            self.sorted = torch.full((self.size, cap), float("inf"), device=device)
            self.count = torch.zeros(self.size, dtype=torch.long, device=device)
            if self.window:
                self.ring = torch.zeros(self.size, self.window, device=device)
            return
        if self.sorted.device != device:  # allocated on the CPU (or loaded): move once
            assert self.count is not None
            self.sorted, self.count = self.sorted.to(device), self.count.to(device)
            if self.ring is not None:
                self.ring = self.ring.to(device)
        if not self.window and self.calls >= self.sorted.shape[1]:
            pad = torch.full_like(self.sorted, float("inf"))
            self.sorted = torch.cat([self.sorted, pad], dim=1)

    def threshold(self, norm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        self._state(norm.device)
        assert self.sorted is not None and self.count is not None
        self.calls += 1
        s = self.sorted if rows is None else self.sorted[rows]
        count = self.count if rows is None else self.count[rows]
        ok = torch.isfinite(norm)
        x = torch.where(ok, norm, torch.zeros_like(norm)).unsqueeze(1)  # [G, 1]
        j = torch.arange(s.shape[1], device=s.device).unsqueeze(0)  # [1, C]
        inf_col = torch.full_like(s[:, :1], float("inf"))
        if self.window:
            assert self.ring is not None
            ring = self.ring if rows is None else self.ring[rows]
            full = count >= self.window
            slot = (count % self.window).unsqueeze(1)
            oldest = ring.gather(1, slot)  # the value leaving the window (when full)
            r = torch.searchsorted(s.contiguous(), oldest)  # its position in the sorted row
            removed = torch.where(j >= r, torch.cat([s[:, 1:], inf_col], dim=1), s)
            s = torch.where((full & ok).unsqueeze(1), removed, s)
            # the ring keeps writing round-robin by total finite insertions
            ring = ring.scatter(1, slot, torch.where(ok.unsqueeze(1), x, oldest))
            if rows is None:
                self.ring = ring
            else:
                self.ring[rows] = ring
        pos = torch.searchsorted(s.contiguous(), x)  # [G, 1]
        shifted = torch.cat([inf_col, s[:, :-1]], dim=1)
        inserted = torch.where(j < pos, s, torch.where(j == pos, x, shifted))
        s = torch.where(ok.unsqueeze(1), inserted, s)
        if self.window:
            # a full window keeps its size; count keeps rising so the ring slot advances
            count = count + ok.long()
            held = torch.clamp(count, max=self.window)
        else:
            count = count + ok.long()
            held = count
        if rows is None:
            self.sorted, self.count = s, count
        else:
            self.sorted[rows] = s
            self.count[rows] = count
        # p-th percentile of the `held` smallest entries (np.percentile, linear)
        n = held.to(norm.dtype)
        k = self.q * torch.clamp(n - 1, min=0)
        lo = torch.floor(k).long()
        hi = torch.minimum(lo + 1, torch.clamp(held - 1, min=0))
        v_lo = s.gather(1, lo.unsqueeze(1)).squeeze(1)
        v_hi = s.gather(1, hi.unsqueeze(1)).squeeze(1)
        thr = v_lo + (k - lo.to(k.dtype)) * (v_hi - v_lo)
        return torch.where(held > 0, thr, torch.full_like(thr, float("inf")))


class ZClip(Clipper):
    """ZClip (Kumar et al. 2025), the reference package's ``zscore``/``adaptive_scaling`` rule.

    Warm-up: the first ``warmup`` finite norms are collected; their mean and population
    variance start the EMAs. Then, with ``z = (g - mu) / (sigma + 1e-6)``: a spike
    (``z > z_thres``) is clipped to ``(mu + z_thres^2 sigma / z) * factor``; the EMAs are updated
    with the clipped value (or ``g``): ``mu <- a mu + (1-a) v``, ``var <- a var + (1-a)(v - mu)^2``
    with the new mu. No fixed cap unless ``max`` is given (the package's hidden default of 1.0
    capped every step of our measured run; docs/remedies.md, "zclip").
    """

    def __init__(self, spec: ClipSpec, size: int) -> None:
        super().__init__(spec, size)
        self.z = float(spec["z"])
        self.alpha = float(spec["alpha"])
        self.warmup = int(spec["warmup"])
        self.factor = float(spec["factor"])
        self.cap = spec["max"]
        # count, buf, mu, var: allocated on the gradients' device at the first step (creating
        # them there is free; copying from the host would be a synchronising transfer)
        self.state: tuple[torch.Tensor, ...] | None = None

    _STATE = ("state",)

    def threshold(self, norm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        dev = norm.device
        if self.state is None:
            self.state = (
                torch.zeros(self.size, dtype=torch.long, device=dev),
                torch.zeros(self.size, self.warmup, device=dev),
                torch.zeros(self.size, device=dev),
                torch.zeros(self.size, device=dev),
            )
        elif self.state[0].device != dev:  # restored from a checkpoint: one copy
            self.state = tuple(t.to(dev) for t in self.state)
        full = self.state
        count, buf, mu, var = full if rows is None else tuple(t[rows] for t in full)
        ok = torch.isfinite(norm)
        g = torch.where(ok, norm, torch.zeros_like(norm))
        ready = count >= self.warmup
        sigma = torch.sqrt(var)
        z = (g - mu) / (sigma + 1e-6)
        spike = ready & ok & (z > self.z)
        clip_to = (mu + self.z * sigma / (z / self.z)) * self.factor
        inf = torch.full_like(g, float("inf"))
        # recorded as clip_threshold: the norm above which this step would have been clipped
        self.boundary = torch.where(ready, mu + self.z * sigma, inf)
        if self.cap is not None:
            self.boundary = torch.clamp(self.boundary, max=float(self.cap))
        thr = torch.where(spike, clip_to, inf)
        if self.cap is not None:
            thr = torch.clamp(thr, max=float(self.cap))
        # EMA update (after warm-up, finite norms only) with the clipped value
        v = torch.where(spike, clip_to, g)
        a = self.alpha
        mu_new = a * mu + (1 - a) * v
        var_new = a * var + (1 - a) * (v - mu_new) ** 2
        upd = ready & ok
        mu = torch.where(upd, mu_new, mu)
        var = torch.where(upd, var_new, var)
        # warm-up: collect, and start the EMAs from the buffer once it is full
        collect = (~ready) & ok
        slot = torch.clamp(count, max=self.warmup - 1).unsqueeze(1)
        buf = buf.scatter(
            1, slot, torch.where(collect, g, buf.gather(1, slot).squeeze(1)).unsqueeze(1)
        )
        count = count + collect.long()
        started = collect & (count == self.warmup)
        mu = torch.where(started, buf.mean(dim=1), mu)
        var = torch.where(started, buf.var(dim=1, unbiased=False), var)
        if rows is None:
            self.state = (count, buf, mu, var)
        else:
            for dst, src in zip(full, (count, buf, mu, var)):
                dst[rows] = src
        return thr


class AGC(Clipper):
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise: each output unit's gradient
    ``G_i`` (a row of a Linear weight, a filter of a conv) is scaled to
    ``clip * max(||W_i||, eps)`` when its norm exceeds that; vectors and scalars (biases, norm
    gains) use the whole tensor's norm. The final layer is left out by default, as NFNets do.
    Same arithmetic as timm's ``adaptive_clip_grad``."""

    def clip_params(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        norms: torch.Tensor,
        measured: int,
        skip: Sequence[bool],
    ) -> ClipResult:
        """``scale_i = min(1, lam * max(||W_i||, eps) / max(||G_i||, 1e-6))``, which is timm's
        ``where(||G_i|| < max_i, G_i, G_i * max_i / max(||G_i||, 1e-6))`` bit for bit (the ratio
        is exactly 1.0 at the boundary, and ``max_i >= lam * eps > 1e-6`` keeps the floor
        inactive wherever it matters). Two unit-wise norms per tensor; the rest is ``_foreach``
        arithmetic on the small per-unit tensors (a few launches for all tensors together)."""
        lam = float(self.spec["clip"])
        eps = float(self.spec["eps"])
        idx = [i for i, s in enumerate(skip) if not s]
        post = norms.clone()
        if idx:
            w_n, g_n = [], []
            for i in idx:
                g = grads[i]
                dims = tuple(range(g.dim())) if g.dim() <= 1 else tuple(range(1, g.dim()))
                w_n.append(
                    torch.linalg.vector_norm(
                        params[i].detach(),
                        dim=dims,
                        keepdim=True,
                        dtype=accumulate_dtype(params[i]),
                    )
                )
                g_n.append(
                    torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=accumulate_dtype(g))
                )
            max_n = torch._foreach_clamp_min(w_n, eps)
            torch._foreach_mul_(max_n, lam)
            scale = torch._foreach_div(max_n, torch._foreach_clamp_min(g_n, 1e-6))
            torch._foreach_clamp_max_(scale, 1.0)
            clipped = [grads[i] for i in idx]
            if all(g.dtype == torch.float32 for g in clipped):
                torch._foreach_mul_(clipped, scale)
            else:
                torch._foreach_mul_(clipped, [s.to(g.dtype) for s, g in zip(scale, clipped)])
            # the post-clip norm of a tensor is the norm of its post-clip unit norms
            post_units = torch._foreach_mul(g_n, scale)
            post_n = torch.stack(torch._foreach_norm(post_units))
            if len(idx) == len(skip):
                post = post_n
            else:
                where = self._cached_index(tuple(idx), norms.device)
                post = post.index_copy(0, where, post_n)
        total_pre = torch.linalg.vector_norm(norms)
        total_post = torch.linalg.vector_norm(post)
        coef = torch.where(norms > 0, post / norms.clamp(min=1e-30), torch.ones_like(norms))
        return ClipResult(post[:measured], coef[:measured], total_pre, total_post, None)

    def threshold(self, norm: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError("AGC clips unit-wise: use clip_params")


def make_clipper(spec: ClipSpec, size: int) -> Clipper:
    """The clipper for ``spec``; ``size``: tensors it may see (rows of per-layer state)."""
    rows = size if spec.per_layer else 1
    if spec.method == "norm":
        return NormClip(spec, rows)
    if spec.method == "autoclip":
        return AutoClip(spec, rows)
    if spec.method == "zclip":
        return ZClip(spec, rows)
    if spec.method == "agc":
        return AGC(spec)
    raise ValueError(f"unknown clipping method {spec.method!r}")
