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

Cost: on the device the hook computes only *sufficient statistics*, with the cheap kernels
measured in docs/costs.md ("Activation statistics"): the sum, the L2 norm (not ``std_mean``,
7-21x slower), the per-unit maximum (``amax`` over the batch, not ``(x <= 0).all(0)``; for ReLU,
whose outputs are never negative, the per-unit *sum* serves both as the dead test and as the
total, one pass fewer), and threshold counts. Means, stds and fractions are derived from them on
the host at flush time (:meth:`ModuleProbe.complete`), so a sampled step launches a handful of
kernels per site. The std comes from the sum and the sum of squares in float32, so a std below
about 1e-3 of the mean's magnitude is not resolved. Nothing kept is an activation: only 0-d or
per-unit statistics, dropped when the step's row is written.

Skipped: forwards with gradients disabled (evaluation), and activation-checkpoint recomputation
(it would count the same activations twice; detected with a private API, only outside
torch.compile where it would break the graph).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..buffer import StepBuffer
from ..compat import is_compiling
from ..config import Config
from ..guard import Guard
from ..hooks import Hook, HookSet, Taken, put_back, take_out
from ..layers import Family, LayerTable, ModuleEntry
from . import numerics
from .sites import (
    COMPACT_AT,
    MASKS_KEPT,
    _Call,
    _pool,
    _Site,
    _softmax_dim,
    _unit_axis,
    complete,
)
from .sites import KIND as KIND

if TYPE_CHECKING:
    from .functional import FunctionalProbe

_NONNEGATIVE = (nn.ReLU, nn.ReLU6)  # outputs >= 0: a unit is dead iff its sum is 0
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


class ModuleProbe:
    """Forward hooks on the watched modules; statistics pooled per site and step.

    Args:
        buffer: Where the statistics go.
        table: The watched modules.
        config: Thresholds and switches.
        count_on_host: Read each output's non-finite flag on the host and count only when set
            (CPU: free). Otherwise count on the device every sampled call.
        guard: Runs every hook (an error switches the activation statistics off).
    """

    def __init__(
        self,
        buffer: StepBuffer,
        table: LayerTable,
        config: Config,
        count_on_host: bool,
        guard: Guard | None = None,
    ) -> None:
        self.guard = guard
        self.buffer = buffer
        self.table = table
        self.config = config
        self.count_on_host = count_on_host
        self._sampling = True
        # Steps that are not sampled measure nothing, so the per-module hooks leave the modules'
        # hook dicts then (a module with any hook takes torch's slow call path on every call)
        # and come back for the next sampled step, in their places. Not for compiled models:
        # dynamo guards on the hook dicts, so toggling them would recompile; nor when the
        # watched modules run without their roots (only their own hooks see those forwards).
        self.parking = True
        self._parked: Taken | None = None
        self._roots: dict[int, nn.Module] = {}
        self._root_seen = False  # a root's forward ran with gradients in this step
        self.stopped_parking: str | None = None
        self.forward_seen = False
        self.forward_ever = False
        self._measured = False  # any site measured since the last finalize()
        # (module, ndim, width); a functional activation's: ("fn", anchor, op, ndim, width)
        self._sites: dict[tuple[Any, ...], _Site] = {}
        self._traced: list[tuple[ModuleEntry, tuple[int, int, int], int | None, _Call]] = []
        self._axis: dict[tuple[int, int], int | None] = {}
        self._per_name: dict[str, int] = {}
        self._handles: dict[str, list[Any]] = {}
        self._hooks: HookSet | None = None
        self.keep_unit_masks = False
        self.whole_masks = False  # several ranks: dead masks go to the flush, to be combined
        self.version = 0  # bumped when the watched modules change (hooked, swapped)
        self.functional: FunctionalProbe | None = None  # F.relu & co. (functional_activations)

    def attach(self, hooks: HookSet, roots: Any = ()) -> None:
        self._hooks = hooks
        for root in roots:
            self.attach_root(root)
        for entry in self.table.modules:
            self.attach_one(entry)

    def attach_root(self, root: nn.Module) -> None:
        """The hook that stays on a watched model's root on every step: it tells a training
        forward of this model (so the backward pass that follows is this scope's) while the
        per-module hooks are parked."""
        hooks = self._hooks
        assert hooks is not None
        if id(root) in self._roots:
            return
        self._roots[id(root)] = root
        seen = Hook(self._on_root, "root-forward", self.guard, "module-forward")
        hooks.add(root.register_forward_pre_hook(seen), "root-forward")

    # -- parking: per-module hooks only on sampled steps ----------------------------------------
    @property
    def sampling(self) -> bool:
        """Whether this step is sampled (statistics are taken). Set between steps."""
        return self._sampling

    @sampling.setter
    def sampling(self, value: bool) -> None:
        self._sampling = value
        if value or not self.parking:
            self.unpark()
        elif self._parked is None and self._hooks is not None:
            self._parked = take_out(h for hs in self._handles.values() for h in hs)

    @property
    def parked(self) -> bool:
        """Whether the per-module hooks are out of the modules now (tests)."""
        return self._parked is not None

    def unpark(self) -> None:
        """Put the per-module hooks back where they were."""
        parked, self._parked = self._parked, None
        if parked is not None:
            put_back(parked)

    def stop_parking(self, why: str) -> None:
        """Keep the per-module hooks in place from now on (``why``: for debugging)."""
        self.parking = False
        self.stopped_parking = why
        self.unpark()

    def attach_one(self, entry: ModuleEntry) -> None:
        """Hook one watched module (at attach, or when a model joins the run later)."""
        hooks = self._hooks
        assert hooks is not None
        parked = self._parked is not None
        self.unpark()  # parked or not, all of them together
        hook = Hook(
            partial(self._on_forward, entry), f"forward {entry.name}", self.guard, "module-forward"
        )
        handles = [hooks.add(entry.module.register_forward_hook(hook), "module-forward")]
        if not entry.is_leaf:
            # a container that owns parameters (a root's positional embedding) is ordered
            # by when its forward starts, not when it ends
            pre = Hook(
                partial(self._on_forward_pre, entry),
                f"forward-pre {entry.name}",
                self.guard,
                "module-forward-pre",
            )
            handles.append(
                hooks.add(entry.module.register_forward_pre_hook(pre), "module-forward-pre")
            )
        self._handles[entry.name] = handles
        self.version += 1
        if parked:
            self.sampling = False

    def replace(self, entry: ModuleEntry, new: nn.Module) -> None:
        """``entry.module`` was replaced by ``new`` in the model (an activation swap): move the
        hooks to it, and keep its sites' names so the records continue under the same layer."""
        from ..layers import activation_family

        parked = self._parked is not None
        self.unpark()
        for handle in self._handles.pop(entry.name, []):
            handle.remove()
        old_id = id(entry.module)
        entry.module = new
        entry.family = activation_family(new, self.config.activation_types)
        self.attach_one(entry)
        for key in [k for k in self._sites if k[0] == old_id]:
            site = self._sites.pop(key)
            fresh = _Site(site.name, entry.family, site.axis, self.buffer, self.guard)
            if site.masks is not None:
                fresh.masks = []
            self._sites[(id(new), key[1], key[2])] = fresh
        for akey in [k for k in self._axis if k[0] == old_id]:
            self._axis[(id(new), akey[1])] = self._axis.pop(akey)
        if parked:
            self.sampling = False

    def started(self, module: nn.Module) -> None:
        """``module``'s forward began before its pre-hook existed: order it now."""
        if id(module) in self._roots:
            self._on_root(module, ())
        for entry in self.table.modules:
            if entry.module is module and not entry.is_leaf:
                self._on_forward_pre(entry, module, ())

    def _site_named(self, name: str) -> _Site | None:
        return next((s for s in self._sites.values() if s.name == name), None)

    def site_units(self, name: str) -> int | None:
        site = self._site_named(name)
        return site.units if site is not None else None

    def dead_unit_indices(self, name: str) -> torch.Tensor | None:
        """Units of site ``name`` dead in each of its last ``MASKS_KEPT`` samples (host read:
        call at flush time only). None until that many samples exist."""
        site = self._site_named(name)
        if site is None or not site.masks or len(site.masks) < MASKS_KEPT:
            return None
        dead = site.masks[0]
        for m in site.masks[1:]:
            if m.shape != dead.shape:
                return None
            dead = dead & m
        return dead.nonzero().reshape(-1).cpu()

    def reset_unit_masks(self, name: str) -> None:
        site = self._site_named(name)
        if site is not None and site.masks is not None:
            site.masks = []

    # -- hooks (measure only: no host reads except the documented CPU flag) ---------------------
    def _on_forward_pre(self, entry: ModuleEntry, module: nn.Module, args: Any) -> None:
        if self.sampling and torch.is_grad_enabled() and not is_compiling():
            self.table.mark_executed(entry.name)

    def _on_root(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.forward_seen = True  # a training forward of this model: its backward is ours
        self._root_seen = True
        if self.parking and is_compiling():
            self.parking = False  # traced: from the next step on, the hooks stay in place

    def _on_forward(self, entry: ModuleEntry, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.forward_seen = True  # a training forward of this model: its backward is ours
        self.forward_ever = True  # the hooks run at all (not so when added after a compile)
        if not self.sampling:
            return
        compiling = is_compiling()
        if compiling:
            self.parking = False  # dynamo guards on the hook dicts: leave them in place
        else:
            if not self._root_seen and self.parking:
                self.stop_parking("a watched module ran outside its root's forward")
            if _in_recompute():
                return
            self.table.mark_executed(entry.name)
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        self._measured = True
        if compiling:
            # Traced into the compiled graph: measure, and queue plain tuples on a list (a side
            # effect dynamo can replay). Creating a site here would not be: it holds a bound
            # method, which dynamo cannot reconstruct (a graph break, measured). Sites are
            # created from the queue in eager code, at the end of the window.
            if entry.family is not None:
                key, axis = self._key(entry, out, args, compiling)
                self._traced.append(
                    (entry, key, axis, self._measure(entry, axis, out.detach(), compiling))
                )
            return
        site = self._site(entry, out, args)
        if entry.family is not None:
            site.calls.append(self._measure(entry, site.axis, out.detach(), compiling))
            if len(site.calls) >= COMPACT_AT:
                site.calls[:] = [_pool(site.calls)]
        if self.config.backward_signal and out.requires_grad:
            # eager only: under torch.compile a tensor hook is a graph break ("unsafe side
            # effect"), so compiled models get no backward signal
            out.register_hook(site.grad_hook)  # type: ignore[no-untyped-call]

    def _key(
        self, entry: ModuleEntry, out: torch.Tensor, args: tuple[Any, ...], compiling: bool
    ) -> tuple[tuple[int, int, int], int | None]:
        """The site key (module, ndim, width) and the unit axis of an output."""
        module = entry.module
        if entry.family is None:
            return (id(module), -1, -1), None  # a layer with parameters: one site, any shape
        ndim = out.dim()
        akey = (id(module), ndim)
        axis = self._axis.get(akey, -2)
        if axis == -2:
            axis = (
                _softmax_dim(module, ndim)
                if entry.family is Family.SOFTMAX
                else _unit_axis(out, args, compiling)
            )
            self._axis[akey] = axis
        width = out.shape[axis] if axis is not None else out.numel()
        return (id(module), ndim, width), axis

    def _site(self, entry: ModuleEntry, out: torch.Tensor, args: tuple[Any, ...]) -> _Site:
        key, axis = self._key(entry, out, args, compiling=False)
        return self._site_for(entry, key, axis)

    def _site_for(self, entry: ModuleEntry, key: tuple[int, int, int], axis: int | None) -> _Site:
        site = self._sites.get(key)
        if site is None:
            site = self.new_site(key, entry.name, entry.family, axis)
        return site

    def new_site(
        self,
        key: tuple[Any, ...],
        base: str,
        family: Family | None,
        axis: int | None,
        signal: bool = True,
    ) -> _Site:
        """A new site under ``key``, named ``base`` (``base#1``, ``base#2``... after the
        first); ``signal``: it records the backward signal."""
        k = self._per_name.get(base, 0)
        self._per_name[base] = k + 1
        name = base if k == 0 else f"{base}#{k}"
        site = self._sites[key] = _Site(name, family, axis, self.buffer, self.guard, signal)
        if self.keep_unit_masks:
            site.masks = []
        site.whole_masks = self.whole_masks
        return site

    def _measure(
        self, entry: ModuleEntry, axis: int | None, o: torch.Tensor, compiling: bool
    ) -> _Call:
        return self.measure(
            entry.family, isinstance(entry.module, _NONNEGATIVE), axis, o, compiling
        )

    def measure(
        self,
        family: Family | None,
        nonnegative: bool,
        axis: int | None,
        o: torch.Tensor,
        compiling: bool,
    ) -> _Call:
        """The sufficient statistics of one activation output ``o`` (``nonnegative``: a ReLU's,
        whose per-unit sum is its dead test)."""
        cfg = self.config
        n = o.numel()
        l2 = numerics.norm(o)  # float32, or float64 for a float64 output
        peak = sat = None
        rows = 0
        if family in (Family.RECTIFIER, Family.OTHER):
            dims = tuple(d for d in range(o.dim()) if d != axis)
            if axis is None:  # every element is a unit (a copy: o may change in place later)
                peak = o.reshape(-1).to(numerics.accumulate_dtype(o) or o.dtype, copy=True)
                s = peak.sum()
            elif nonnegative and cfg.dead_threshold == 0.0:
                peak = numerics.total(o, dims)  # [units]: 0 iff dead, one pass
                s = peak.sum()
            else:
                peak = o.amax(dim=dims)  # [units]
                s = numerics.total(o)
        else:
            s = numerics.total(o)
            if family is Family.SIGMOID:
                sat = ((o - 0.5).abs() > cfg.sigmoid_saturation).sum()
            elif family is Family.TANH:
                sat = (o.abs() > cfg.tanh_saturation).sum()
            elif family is Family.SOFTMAX:
                dim = axis if axis is not None else -1
                sat = (o.amax(dim=dim) > cfg.softmax_saturation).sum()
                rows = n // max(o.shape[dim], 1) if o.dim() else 1
        nonfinite = None
        # A finite L2 norm proves every element finite (an fp32 overflow of huge finite values
        # is a false alarm that the exact count then clears).
        # is_compiling() again, not only the caller's flag: under an in-place model.compile()
        # dynamo may compile this frame on its own, called from a hook that ran eagerly
        if not self.count_on_host or compiling or is_compiling() or not math.isfinite(l2.item()):
            nonfinite = torch.logical_not(torch.isfinite(o)).sum()
        return _Call(n, s, l2, peak, sat, nonfinite, rows)

    # -- step boundaries ----------------------------------------------------------------------
    def end_window(self) -> None:
        """A backward pass ended: what was measured so far belongs to the current step."""
        if self._traced:  # measured inside a compiled graph: file under sites now
            traced, self._traced = self._traced, []
            for entry, key, axis, call in traced:
                self._site_for(entry, key, axis).calls.append(call)
        if self._measured:  # nothing to move on unsampled steps: skip the loop
            for site in self._sites.values():
                site.end_window()

    def finalize(self) -> None:
        """Write the pooled raw statistics of the closed windows into the current row."""
        if not self._measured:
            return
        thr = self.config.dead_threshold
        pending = bool(self._traced)
        into: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for site in self._sites.values():
            site.write(thr, into)
            pending = pending or bool(site.calls or site.grads)
        # every site's statistics of the step in one group per device: one tensor for the
        # flush to read, not a handful per site (a model of 1,500 modules wrote ~9,000)
        for cols, values in into.values():
            # (stack promotes: int64 counts beside float32 statistics become float32, which is
            # what the flush made of each of them alone)
            stacked = values[0].reshape(1) if len(values) == 1 else torch.stack(values)
            self.buffer.write(self.buffer.group_of(tuple(cols)), stacked)
        # A step closed by the next backward pass (no optimizer) already holds the next
        # step's forward in the open window: it is still measured, for the next row.
        self._measured = pending

    # at flush, on the host: the published metrics from the raw sufficient statistics
    complete = staticmethod(complete)

    def site_names(self) -> list[str]:
        return [site.name for site in self._sites.values()]

    def discard(self) -> None:
        """Forget everything measured since the last written step (it produced no step)."""
        for site in self._sites.values():
            site.clear()
        self._traced.clear()
        self._measured = False

    def new_step(self) -> None:
        """A step was written: the next one starts with no forward seen."""
        self.forward_seen = False
        self._root_seen = False

    def release(self) -> None:
        self._parked = None  # the Scope removed its handles: nothing goes back
        self._roots.clear()
        for site in self._sites.values():
            site.clear()
        self._sites.clear()
