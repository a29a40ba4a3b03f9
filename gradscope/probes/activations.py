"""Per-module statistics from one forward hook: activation health and the backward signal.

On sampled steps (``ModuleProbe.sampling``, a plain bool set between steps, so a compiled graph
guards on it instead of recompiling on a step counter) the hook reads each watched module's
output:

* activations (ReLU family, sigmoid, tanh, softmax, user-named types): dead fraction (units whose
  output is ``<= dead_threshold`` for every example and position), saturation, mean, std and the
  non-finite count;
* every watched module: a tensor hook on its output records the norm of the gradient with respect
  to that output, the backward signal. Weight-gradient norms alone are blind to depth-wise
  explosion in ReLU nets; this sees it. It is a tensor hook registered from the forward hook,
  never ``register_full_backward_hook``, which breaks ``ReLU(inplace=True)`` (pytorch#61519).

A *site* is one module at one output width. A module called several times per step pools its
calls per site: a unit is dead only if it is dead in every call (every micro-batch, every time
step of an RNN cell); a shared ``self.act = nn.ReLU()`` applied after layers of different widths
gives one site per width (``act``, ``act#1``...).

Kernels are the cheap ones measured in notes/mechanics.md: ``amax`` over the batch (not
``(x <= 0).all(0)``), ``sum`` and ``vector_norm`` for mean and std (not ``std_mean``: 7-21x
slower). The std comes from the sum and the sum of squares in float32, so a std below about
1e-3 of the mean's magnitude is not resolved. Statistics are detached 0-d or per-unit tensors,
never activations; they are dropped when the step's row is written.

Skipped: forwards with gradients disabled (evaluation), and activation-checkpoint recomputation
(it would count the same activations twice; detected with a private API, only outside
torch.compile where it would break the graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..buffer import Group, StepBuffer
from ..config import Config
from ..hooks import Hook, HookSet
from ..layers import Family, LayerTable, ModuleEntry

KIND = "module"
COMPACT_AT = 64  # pool a site's per-call statistics once this many calls are pending

_CHANNEL_FIRST = ("Convolution", "BatchNorm", "Pool", "GroupNorm", "InstanceNorm")
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _in_recompute() -> bool:
    """Inside activation-checkpoint recomputation (a forward run by the backward engine)."""
    return _graph_task_id is not None and _graph_task_id() != -1


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


class _Site:
    """Statistics of one module at one output width, pooled over the calls of a step."""

    __slots__ = (
        "act_group", "axis", "calls", "done", "family", "grad_done", "grad_group", "grad_hook",
        "grads", "name",
    )

    def __init__(self, name: str, family: Family | None, axis: int | None, buffer: StepBuffer):
        self.name = name
        self.family = family
        self.axis = axis
        # per call: (n, sum, sum of squares, per-unit max or None, saturated count or None,
        #            non-finite count or None, distributions (softmax rows))
        self.calls: list[tuple[Any, ...]] = []  # current window
        self.done: list[tuple[Any, ...]] = []  # windows already closed in this step
        self.grads: list[torch.Tensor] = []  # squared norms of output gradients, current window
        self.grad_done: list[torch.Tensor] = []
        self.grad_hook = Hook(self._add_grad, f"output-grad {name}")
        self.grad_group = buffer.group(((name, KIND, "output_grad_norm"),))
        metrics: tuple[str, ...]
        if family in (Family.RECTIFIER, Family.OTHER):
            metrics = ("act_dead_fraction", "act_mean", "act_std", "act_nonfinite")
        elif family is not None:
            metrics = ("act_saturation", "act_mean", "act_std", "act_nonfinite")
        else:
            metrics = ()
        self.act_group = buffer.group(tuple((name, KIND, m) for m in metrics)) if metrics else None

    def _add_grad(self, grad: torch.Tensor) -> None:
        n = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
        self.grads.append(n * n)
        if len(self.grads) >= COMPACT_AT:
            self.grads[:] = [torch.stack(self.grads).sum()]

    def end_window(self) -> None:
        self.done.extend(self.calls)
        self.calls.clear()
        self.grad_done.extend(self.grads)
        self.grads.clear()
        if len(self.done) >= COMPACT_AT:
            self.done[:] = [_pool(self.done)]

    def clear(self) -> None:
        self.calls.clear()
        self.done.clear()
        self.grads.clear()
        self.grad_done.clear()


def _pool(calls: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Merge per-call statistics into one entry of the same shape."""
    n = sum(c[0] for c in calls)
    s = torch.stack([c[1] for c in calls]).sum()
    q = torch.stack([c[2] for c in calls]).sum()
    peaks = [c[3] for c in calls if c[3] is not None]
    amax = torch.stack(peaks).amax(0) if peaks else None
    sats = [c[4] for c in calls if c[4] is not None]
    sat = torch.stack(sats).sum() if sats else None
    nfs = [c[5] for c in calls if c[5] is not None]
    nf = torch.stack(nfs).sum() if nfs else None
    rows = sum(c[6] for c in calls)
    return (n, s, q, amax, sat, nf, rows)


class ModuleProbe:
    """Forward hooks on the watched modules; statistics pooled per site and step.

    Args:
        buffer: Where the statistics go.
        table: The watched modules.
        config: Thresholds and switches.
        count_on_host: Read each output's non-finite flag on the host and count only when set
            (CPU: free). Otherwise count on the device every sampled call.
    """

    def __init__(
        self, buffer: StepBuffer, table: LayerTable, config: Config, count_on_host: bool
    ) -> None:
        self.buffer = buffer
        self.table = table
        self.config = config
        self.count_on_host = count_on_host
        self.sampling = True
        self.forward_seen = False
        self._measured = False  # any site measured since the last finalize()
        self._sites: dict[tuple[int, int, int], _Site] = {}
        self._axis: dict[tuple[int, int], int | None] = {}
        self._per_name: dict[str, int] = {}

    def attach(self, hooks: HookSet) -> None:
        for entry in self.table.modules:
            hook = Hook(partial(self._on_forward, entry), f"forward {entry.name}")
            hooks.add(entry.module.register_forward_hook(hook), "module-forward")
            if not entry.is_leaf:
                # a container that owns parameters (a root's positional embedding) is ordered
                # by when its forward starts, not when it ends
                pre = Hook(partial(self._on_forward_pre, entry), f"forward-pre {entry.name}")
                hooks.add(entry.module.register_forward_pre_hook(pre), "module-forward-pre")

    # -- hooks (measure only: no host reads except the documented CPU flag) ---------------------
    def _on_forward_pre(self, entry: ModuleEntry, module: nn.Module, args: Any) -> None:
        if self.sampling and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.table.mark_executed(entry.name)

    def _on_forward(self, entry: ModuleEntry, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.forward_seen = True  # a training forward of this model: its backward is ours
        if not self.sampling:
            return
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if _in_recompute():
                return
            self.table.mark_executed(entry.name)
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        site = self._site(entry, out, args, compiling)
        self._measured = True
        if entry.family is not None:
            site.calls.append(self._measure(entry, site, out.detach(), compiling))
            if len(site.calls) >= COMPACT_AT:
                site.calls[:] = [_pool(site.calls)]
        if self.config.backward_signal and out.requires_grad and not compiling:
            # graph break under torch.compile ("unsafe side effect"), hence eager only
            out.register_hook(site.grad_hook)

    def _site(
        self, entry: ModuleEntry, out: torch.Tensor, args: tuple[Any, ...], compiling: bool
    ) -> _Site:
        module = entry.module
        ndim = out.dim()
        if entry.family is None:
            key = (id(module), -1, -1)  # a layer with parameters: one site, whatever its shape
            axis: int | None = None
        else:
            akey = (id(module), ndim)
            if akey not in self._axis:
                self._axis[akey] = (
                    _softmax_dim(module, ndim)
                    if entry.family is Family.SOFTMAX
                    else _unit_axis(out, args, compiling)
                )
            axis = self._axis[akey]
            width = out.shape[axis] if axis is not None else out.numel()
            key = (id(module), ndim, width)
        site = self._sites.get(key)
        if site is None:
            k = self._per_name.get(entry.name, 0)
            self._per_name[entry.name] = k + 1
            name = entry.name if k == 0 else f"{entry.name}#{k}"
            site = self._sites[key] = _Site(name, entry.family, axis, self.buffer)
        return site

    def _measure(
        self, entry: ModuleEntry, site: _Site, o: torch.Tensor, compiling: bool
    ) -> tuple[Any, ...]:
        cfg = self.config
        family = site.family
        n = o.numel()
        s = o.sum(dtype=torch.float32)
        q = torch.linalg.vector_norm(o, dtype=torch.float32)
        q = q * q
        amax = sat = None
        rows = 0
        if family in (Family.RECTIFIER, Family.OTHER):
            if site.axis is None:
                amax = o.reshape(-1).to(torch.float32, copy=True)
            else:
                dims = tuple(d for d in range(o.dim()) if d != site.axis)
                amax = o.amax(dim=dims).float()  # [units]
        elif family is Family.SIGMOID:
            sat = ((o - 0.5).abs() > cfg.sigmoid_saturation).sum()
        elif family is Family.TANH:
            sat = (o.abs() > cfg.tanh_saturation).sum()
        elif family is Family.SOFTMAX:
            dim = site.axis if site.axis is not None else -1
            sat = (o.amax(dim=dim) > cfg.softmax_saturation).sum()
            rows = n // max(o.shape[dim], 1) if o.dim() else 1
        nf = None
        # A finite sum of squares proves every element finite (an fp32 overflow of huge finite
        # values is a false alarm that the exact count then clears).
        if not self.count_on_host or compiling or not bool(torch.isfinite(q)):
            nf = torch.logical_not(torch.isfinite(o)).sum()
        return (n, s, q, amax, sat, nf, rows)

    # -- step boundaries ----------------------------------------------------------------------
    def end_window(self) -> None:
        """A backward pass ended: what was measured so far belongs to the current step."""
        if self._measured:  # nothing to move on unsampled steps: skip the loop
            for site in self._sites.values():
                site.end_window()

    def finalize(self) -> None:
        """Write the pooled statistics of the closed windows into the current row."""
        if not self._measured:
            return
        self._measured = False
        thr = self.config.dead_threshold
        for site in self._sites.values():
            if site.done and site.act_group is not None:
                n, s, q, amax, sat, nf, rows = _pool(site.done)
                mean = s / n
                var = (q - s * s / n) / max(n - 1, 1)
                std = var.clamp_min(0).sqrt()
                nonfinite = nf if nf is not None else torch.zeros((), device=s.device)
                if site.family in (Family.RECTIFIER, Family.OTHER):
                    first = (amax <= thr).float().mean()
                else:
                    first = sat.float() / (rows if site.family is Family.SOFTMAX else n)
                values = torch.stack([first, mean, std, nonfinite.float()])
                self.buffer.write(site.act_group, values)
            if site.grad_done:
                self.buffer.write(site.grad_group, torch.stack(site.grad_done).sum().sqrt())
            site.done.clear()
            site.grad_done.clear()

    def discard(self) -> None:
        """Forget everything measured since the last written step (it produced no step)."""
        for site in self._sites.values():
            site.clear()
        self._measured = False

    def site_names(self) -> list[str]:
        return [site.name for site in self._sites.values()]

    def release(self) -> None:
        for site in self._sites.values():
            site.clear()
        self._sites.clear()
