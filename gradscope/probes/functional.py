"""Activations called as functions inside a watched model's ``forward()``.

The module probe (:mod:`gradscope.probes.activations`) reads the outputs of activation
*modules*. ``F.relu(self.conv1(x))``, ``torch.sigmoid(h)``, ``x.tanh()`` have no module and no
hook, so a model written that way (pytorch/examples' MNIST net) got no dead-unit or saturation
check. This probe covers them, on sampled steps only:

* a forward pre-hook on each watched model's root module (a plain check that returns at once on
  unsampled steps, under torch.compile, with gradients disabled and during an activation
  checkpoint's recompute) enters a ``torch.overrides.TorchFunctionMode`` and registers global
  module forward pre/post hooks, the post hook with ``always_call=True`` (torch >= 2.0): its
  call for the root, when the root's forward returns *or raises*, takes the mode and both
  hooks away. The mode never outlives the forward (``close()`` and the next sampled forward
  also take away one left behind by a ``KeyboardInterrupt``);
* the global hooks keep the stack of running modules of the watched models: the innermost one
  is the *enclosing* module, and the last watched module that finished inside it is the
  *anchor*, the layer whose output the activation reads (``conv1`` in
  ``F.relu(self.conv1(x))``);
* every torch call of the forward passes through the mode; a call of an activation function
  (:data:`OPS`) runs unchanged, its result is returned as it is, and is then measured with the
  module probe's sufficient statistics (:meth:`ModuleProbe.measure
  <gradscope.probes.activations.ModuleProbe.measure>`) into a site named
  ``<anchor>:<op>`` (``conv1:relu``; ``<enclosing module>:<op>`` when no watched module
  finished before it in that forward). A site is one anchor, function and output width: calls
  after the same layer at the same width pool (a model called several times per step, an RNN
  cell's time steps); another width gets ``#1``, ``#2``... as module sites do.

Calls made inside an activation *module* (``nn.ReLU.forward`` calls ``F.relu``) are skipped:
the module probe measures those. A compiled model gets none (its root hook runs inside dynamo,
which this probe never enters), and neither does a model that holds a compiled submodule: a
mode active around a compiled call makes dynamo compile it again for the mode.

Functional sites carry the activation statistics (dead fraction or saturation, mean, std,
non-finite count), not the backward signal: the layer before them has its own. run.json lists
each as a module entry with ``"functional"`` (how it was called), ``"anchor"`` and
``"within"``, right after its anchor in forward order, so the depth-ordered rules see it in
place.

Cost: one Python call per torch call of the forward on sampled steps (docs/costs.md,
"Functional activations"), none on the others. A root whose first ``QUIET_AFTER`` sampled
forwards call no activation function (its activations are all modules) is not intercepted
again: on a model of many modules the interception alone cost more than everything else a
sampled step measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..compat import is_compiling
from ..config import Config
from ..guard import FUNCTIONAL, Guard
from ..hooks import Hook, HookSet
from ..layers import Family, FunctionalSite, LayerTable, ModuleEntry, activation_family
from ..naming import holds_compiled
from .activations import ModuleProbe, _in_recompute
from .sites import COMPACT_AT, _pool, _unit_axis

ENTRY = "functional"  # the guard's entry point (part "functional")


class Op(NamedTuple):
    """An activation function the probe measures."""

    name: str  # the site's suffix: "relu"
    label: str  # how it was called: "F.relu", "torch.sigmoid", "Tensor.tanh"
    type: str  # the equivalent module's class name, which the rules read: "ReLU"
    family: Family
    nonnegative: bool  # outputs >= 0 (ReLU, ReLU6): a unit is dead iff its sum is 0
    like: nn.Module  # an instance of the equivalent module (include_types/exclude_types)


def _ops() -> dict[Any, Op]:
    F = torch.nn.functional
    T = torch.Tensor
    table: list[tuple[str, type[nn.Module], list[tuple[object, str]]]] = [
        ("relu", nn.ReLU, [(F, "relu"), (F, "relu_"), (torch, "relu"), (torch, "relu_")]),
        ("relu", nn.ReLU, [(T, "relu"), (T, "relu_")]),
        ("relu6", nn.ReLU6, [(F, "relu6")]),
        ("leaky_relu", nn.LeakyReLU, [(F, "leaky_relu"), (F, "leaky_relu_")]),
        ("elu", nn.ELU, [(F, "elu"), (F, "elu_")]),
        ("selu", nn.SELU, [(F, "selu"), (torch, "selu")]),
        ("celu", nn.CELU, [(F, "celu")]),
        ("gelu", nn.GELU, [(F, "gelu")]),
        ("silu", nn.SiLU, [(F, "silu")]),
        ("mish", nn.Mish, [(F, "mish")]),
        ("hardswish", nn.Hardswish, [(F, "hardswish")]),
        ("sigmoid", nn.Sigmoid, [(torch, "sigmoid"), (torch, "sigmoid_")]),
        ("sigmoid", nn.Sigmoid, [(T, "sigmoid"), (T, "sigmoid_")]),
        ("hardsigmoid", nn.Hardsigmoid, [(F, "hardsigmoid")]),
        ("tanh", nn.Tanh, [(torch, "tanh"), (torch, "tanh_"), (T, "tanh"), (T, "tanh_")]),
        ("hardtanh", nn.Hardtanh, [(F, "hardtanh")]),
    ]
    prefix = {id(F): "F", id(torch): "torch", id(T): "Tensor"}
    out: dict[Any, Op] = {}
    for name, cls, where in table:
        like = cls()
        family = activation_family(like)
        assert family is not None
        for owner, attr in where:
            fn = getattr(owner, attr, None)
            if fn is not None and fn not in out:
                label = f"{prefix[id(owner)]}.{attr}"
                out[fn] = Op(name, label, cls.__name__, family, cls in (nn.ReLU, nn.ReLU6), like)
    return out


OPS: dict[Any, Op] = _ops()
"""The activation functions measured, by the function object torch hands the mode."""
_HARDTANH = torch.nn.functional.hardtanh


def _default_bounds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``F.hardtanh`` reads as a tanh (saturation at +-1) only with its default bounds."""
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return bool(lo == -1.0 and hi == 1.0)


QUIET_AFTER = 2
"""Sampled forwards of a root with no activation function called (outside activation modules)
after which the mode is no longer entered for that root."""


class _Frame:
    """One running module of a watched model: where its forward began (in finished watched
    modules) and whether activations called inside it are skipped."""

    __slots__ = ("module", "skip", "start")

    def __init__(self, module: nn.Module, start: int, skip: bool) -> None:
        self.module = module
        self.start = start
        self.skip = skip


class _Mode(TorchFunctionMode):
    """Runs every torch call unchanged; hands activation calls to the probe."""

    def __init__(self, probe: FunctionalProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        try:
            op = OPS.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            op = None
        if op is None:
            return func(*args, **kwargs)
        return self.probe.call(op, func, args, kwargs)


def _mode_stack() -> list[Any]:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


class FunctionalProbe:
    """Measures the functional activations of the watched models on sampled steps.

    Args:
        probe: The module probe (sampling switch, sites, statistics, step windows).
        table: The watched layers (names, the filters, run.json's layer list).
        config: Thresholds, filters, ``activation_types``.
        guard: An error switches the part ``functional`` off (the original result is
            returned; the forward is left without the mode).
    """

    def __init__(self, probe: ModuleProbe, table: LayerTable, config: Config, guard: Guard) -> None:
        self.probe = probe
        self.table = table
        self.config = config
        self.guard = guard
        self.spans = 0  # sampled forwards intercepted (tests, the benchmark)
        self._mode = _Mode(self)
        self._hooks: HookSet | None = None
        self._stack: list[_Frame] = []
        self._seq = 0  # watched modules finished in this span
        self._last: tuple[nn.Module, str] | None = None  # the last anchor that finished
        self._last_seq = -1
        self._after: str | None = None  # the last watched module that finished
        self._anchors: dict[int, str | None] = {}
        self._global: list[RemovableHandle] = []
        self._entries: dict[int, ModuleEntry] = {}
        self._entries_of: tuple[int, int] = (-1, -1)
        self._acts: dict[int, bool] = {}
        # roots whose sampled forwards call no activation function: after QUIET_AFTER such
        # spans the mode is no longer entered for them (it costs one Python call per torch
        # call of the forward, for nothing)
        self._span_root: int | None = None
        self._span_found = False
        self._spans_of: dict[int, int] = {}
        self._found: set[int] = set()
        self.quiet: set[int] = set()
        self._ignored: set[tuple[Any, ...]] = set()  # keys of sites the filters leave out
        self._roots: dict[int, nn.Module] = {}  # roots hooked, by id
        self._pre = Hook(self._on_pre, "functional-module-pre", guard, ENTRY)
        # not skipped when the part is off (a Hook with a guard would be): the root's call of
        # it ends the span, whatever happened before; it guards itself
        self._post = Hook(self._on_post, "functional-module-post")

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, hooks: HookSet, models: Iterable[nn.Module]) -> None:
        self._hooks = hooks
        for model in models:
            self.attach_root(model)

    def attach_root(self, model: nn.Module) -> None:
        """Hook a watched model's root module (at attach, or when a model joins later)."""
        hooks = self._hooks
        assert hooks is not None
        if id(model) in self._roots:  # add_model() of a model already watched
            return
        self._roots[id(model)] = model
        enter = Hook(self._on_root_pre, "functional-enter", self.guard, ENTRY)
        hooks.add(model.register_forward_pre_hook(enter), "functional-enter")
        # No forward hook on the root: dynamo traces a root's hooks into a compiled graph, and
        # tracing an always_call hook's output warns (a non-leaf .grad read). The global
        # always_call forward hook, registered only while the span is open, ends it instead.

    def close(self) -> None:
        """Leave the span if one is open (the Scope closes): no hook, no mode left."""
        self._leave()
        self._acts.clear()
        self._entries.clear()
        self._roots.clear()

    @property
    def active(self) -> bool:
        """Whether the mode is on torch's function-mode stack now (tests)."""
        return any(m is self._mode for m in _mode_stack())

    # -- the span: a sampled forward of a watched root -------------------------------------
    def _on_root_pre(self, module: nn.Module, args: Any) -> None:
        if is_compiling():  # traced into a compiled graph: never entered there
            return
        if self._stack:  # a watched model called inside another's sampled forward
            return
        probe = self.probe
        if not probe.sampling or not torch.is_grad_enabled() or _in_recompute():
            return
        if id(module) in self.quiet or holds_compiled(module):
            return
        self._enter(module)

    def _enter(self, root: nn.Module) -> None:
        self._leave()  # one left behind by an interrupted forward
        shape = (len(self.table.modules), self.probe.version)
        if shape != self._entries_of:
            self._entries = {id(e.module): e for e in self.table.modules}
            self._entries_of = shape
            self._anchors.clear()
        self._stack = [_Frame(root, 0, self.table.module_name(root) is None)]
        self._span_root, self._span_found = id(root), False
        self._seq, self._last, self._last_seq, self._after = 0, None, -1, None
        try:
            reg = nn.modules.module
            self._global = [
                reg.register_module_forward_pre_hook(self._pre),
                reg.register_module_forward_hook(self._post, always_call=True),
            ]
            torch._C._push_on_torch_function_stack(self._mode)  # what __enter__ does
        except BaseException:
            self._leave()
            raise
        self.spans += 1

    def _leave(self) -> None:
        root, self._span_root = self._span_root, None
        if root is not None:
            if self._span_found:
                self._found.add(root)
            elif root not in self._found:
                spans = self._spans_of[root] = self._spans_of.get(root, 0) + 1
                if spans >= QUIET_AFTER:
                    self.quiet.add(root)
        self._stack = []
        self._last = self._after = None
        for handle in self._global:
            handle.remove()
        self._global = []
        if torch._C._len_torch_function_stack() and self.active:
            above: list[Any] = []  # modes entered above ours and left there: put back
            while torch._C._len_torch_function_stack():
                mode = torch._C._pop_torch_function_stack()
                if mode is self._mode:
                    break
                above.append(mode)
            for mode in reversed(above):
                torch._C._push_on_torch_function_stack(mode)

    # -- global module hooks, inside the span ------------------------------------------------
    def _on_pre(self, module: nn.Module, args: Any) -> None:
        stack = self._stack
        if not stack:
            return
        skip = stack[-1].skip or not self.table.contains(module) or self._is_activation(module)
        stack.append(_Frame(module, self._seq, skip))

    def _on_post(self, module: nn.Module, args: Any, output: Any) -> None:
        """A module's forward returned or raised (``always_call``): pop its frame; the
        root's ends the span. Anchors the sites that follow it."""
        stack = self._stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].module is module:
                del stack[i:]
                break
        else:
            return
        if not stack:  # the root's forward is over (or raised): no mode, no global hook
            self._leave()
            return
        guard = self.guard
        if guard.off and not guard.active(FUNCTIONAL):
            return
        try:
            self._anchor(module)
        except Exception as exc:
            guard.fail(ENTRY, exc)

    def _anchor(self, module: nn.Module) -> None:
        name = self._anchors.get(id(module), "")
        if name == "":
            name = self._anchors[id(module)] = self._anchor_name(module)
        if name is not None:
            self._seq += 1
            self._last, self._last_seq = (module, name), self._seq
            entry = self._entries.get(id(module))
            if entry is not None and entry.module is module:
                self._after = entry.name

    def _anchor_name(self, module: nn.Module) -> str | None:
        """The name of a module that can anchor a site: a watched one, or a layer of a
        watched model that the filters left out or that is frozen (it owns parameters)."""
        entry = self._entries.get(id(module))
        if entry is not None and entry.module is module:
            return entry.name
        if self._is_activation(module) or next(module.parameters(False), None) is None:
            return None
        return self.table.module_name(module)

    def _is_activation(self, module: nn.Module) -> bool:
        known = self._acts.get(id(module))
        if known is None:
            known = self._acts[id(module)] = (
                activation_family(module, self.config.activation_types) is not None
            )
        return known

    # -- an activation call ------------------------------------------------------------------
    def call(
        self, op: Op, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``func`` unchanged; measure its result where it is one of ours."""
        stack = self._stack
        guard = self.guard
        if (
            not stack
            or stack[-1].skip
            or not torch.is_grad_enabled()
            or (guard.off and not guard.active(FUNCTIONAL))
        ):
            return func(*args, **kwargs)
        frame = stack[-1]
        self._span_found = True
        try:
            if guard.faults:
                guard.fault(ENTRY)
            x = args[0] if args else kwargs.get("input")
            measured = (
                isinstance(x, torch.Tensor)
                and x.is_floating_point()
                and not _in_recompute()
                and (func is not _HARDTANH or _default_bounds(args, kwargs))
            )
            # the unit axis from the input, before an in-place call replaces its grad_fn
            axis = _unit_axis(x, (x,), False) if isinstance(x, torch.Tensor) and measured else None
        except Exception as exc:
            guard.fail(ENTRY, exc)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if measured:
            try:
                self._record(op, frame, axis, out)
            except Exception as exc:
                guard.fail(ENTRY, exc)
        return out

    def _record(self, op: Op, frame: _Frame, axis: int | None, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        last = self._last
        anchor = last[1] if last is not None and self._last_seq > frame.start else None
        owner = last[0] if last is not None and anchor is not None else frame.module
        width = out.shape[axis] if axis is not None else out.numel()
        key = ("fn", id(owner), op.name, out.dim(), width)
        probe = self.probe
        site = probe._sites.get(key)
        if site is None:
            if key in self._ignored:
                return
            within = self.table.module_name(frame.module)
            if within is None:
                return
            base = anchor if anchor is not None else within
            name = f"{base}:{op.name}"
            if not self.table.allows(name, base, op.like, self.config):
                self._ignored.add(key)
                return
            site = probe.new_site(key, name, op.family, axis, signal=False)
            if site.name == name:
                self.table.add_functional(
                    FunctionalSite(
                        name,
                        op.label,
                        op.type,
                        op.family,
                        anchor,
                        within,
                        self._after,
                    )
                )
        site.calls.append(probe.measure(op.family, op.nonnegative, axis, out.detach(), False))
        if len(site.calls) >= COMPACT_AT:
            site.calls[:] = [_pool(site.calls)]
        probe._measured = True


def attach_functional(
    probe: ModuleProbe,
    table: LayerTable,
    config: Config,
    guard: Guard,
    hooks: HookSet,
    models: Iterable[nn.Module],
) -> FunctionalProbe:
    """A :class:`FunctionalProbe` hooked on ``models``' roots, known to ``probe``."""
    fp = probe.functional = FunctionalProbe(probe, table, config, guard)
    fp.attach(hooks, models)
    return fp
