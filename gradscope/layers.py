"""Which parameters and modules a Scope watches, under which names, in which order.

Names are PyTorch's qualified names (``encoder.layers.3.linear1.weight``); with several models
watched at once each gets a prefix. A parameter shared by two modules (tied weights) is watched
once under its first name and lists the others as aliases. Layers are ordered by their first
execution in a forward pass (gradient flow reads from input to output); layers never executed
keep their definition order, after the executed ones.

Nothing here holds a tensor of a step. Parameters and modules are referenced while the Scope is
open and released by ``close()``.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Config, type_matches
from .records import ROOT as ROOT


class Family(enum.Enum):
    """How an activation's output is read: which of dead fraction and saturation apply."""

    RECTIFIER = "rectifier"  # dead fraction: units <= threshold for the whole batch
    SIGMOID = "sigmoid"  # saturation: |y - 0.5| > threshold
    TANH = "tanh"  # saturation: |y| > threshold
    SOFTMAX = "softmax"  # saturation: max probability > threshold
    OTHER = "other"  # user-named types: dead fraction, mean, std, non-finite


_FAMILIES: tuple[tuple[tuple[type[nn.Module], ...], Family], ...] = (
    (
        (
            nn.ReLU,
            nn.ReLU6,
            nn.LeakyReLU,
            nn.PReLU,
            nn.RReLU,
            nn.ELU,
            nn.CELU,
            nn.SELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Hardswish,
        ),
        Family.RECTIFIER,
    ),
    ((nn.Sigmoid, nn.Hardsigmoid), Family.SIGMOID),
    ((nn.Tanh, nn.Hardtanh, nn.Softsign), Family.TANH),
    ((nn.Softmax,), Family.SOFTMAX),
)


def activation_family(module: nn.Module, extra: tuple[Any, ...] = ()) -> Family | None:
    """The family of an activation module, or None when ``module`` is not an activation."""
    for types, family in _FAMILIES:
        if isinstance(module, types):
            return family
    if extra and type_matches(module, extra):
        return Family.OTHER
    return None


@dataclass(eq=False)
class ParamSlot:
    """One watched parameter: its index in the table, its names and the tensor itself."""

    index: int
    name: str
    module_name: str
    param: nn.Parameter
    aliases: tuple[str, ...] = ()
    # FSDP1 flat parameters: this parameter is ``param``'s local shard[offset:offset + length]
    span: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None  # the original shape, where ``param`` is a shard
    dtensor: bool = False  # FSDP2: ``param`` and its gradient are DTensors (read the local part)

    def local_grad(self) -> torch.Tensor | None:
        """This rank's part of the gradient (all of it outside FSDP)."""
        g = self.param.grad
        if g is None:
            return None
        if self.dtensor:
            g = g.to_local()  # type: ignore[attr-defined]
        if self.span is not None:
            g = g.reshape(-1).narrow(0, self.span[0], self.span[1])
        return g

    def local_weight(self) -> torch.Tensor:
        """This rank's part of the weights, detached."""
        w = self.param.detach()
        if self.dtensor:
            w = w.to_local()  # type: ignore[attr-defined]
        if self.span is not None:
            w = w.reshape(-1).narrow(0, self.span[0], self.span[1])
        return w


@dataclass(frozen=True)
class FunctionalSite:
    """An activation called as a function inside a watched module's ``forward()``
    (``F.relu(self.conv1(x))``): where it ran, for run.json and the rules.

    Attributes:
        name: The site's name, ``<anchor>:<op>`` (``conv1:relu``).
        label: How it was called (``F.relu``, ``torch.sigmoid``, ``Tensor.tanh``).
        type: The class name of the equivalent module (``ReLU``): what the rules read.
        family: Its activation family.
        anchor: The watched module whose output it activates (None: unknown, then ``within``).
        within: The module whose ``forward()`` called it.
        after: The watched module it runs right after, in forward order (None: before all).
    """

    name: str
    label: str
    type: str
    family: Family
    anchor: str | None
    within: str
    after: str | None


@dataclass(eq=False)
class ModuleEntry:
    """One watched module: an activation (family set) and/or the owner of watched parameters."""

    name: str
    module: nn.Module
    family: Family | None
    owns_params: bool
    is_leaf: bool


@dataclass
class LayerTable:
    """The watched parameters and modules of one Scope, with their forward order."""

    params: list[ParamSlot] = field(default_factory=list)
    modules: list[ModuleEntry] = field(default_factory=list)
    _by_param: dict[int, list[ParamSlot]] = field(default_factory=dict)  # FSDP1 flat: several
    _order: dict[str, int] = field(default_factory=dict)  # module name -> first forward rank
    _seen: dict[int, nn.Module] = field(default_factory=dict)  # every module walked, by id
    _names: dict[int, str] = field(default_factory=dict)  # their first qualified names
    functional: list[FunctionalSite] = field(default_factory=list)  # in order of discovery
    _indices: int = 0  # slot indices handed out (never reused)

    def _new_index(self) -> int:
        self._indices += 1
        return self._indices - 1

    @classmethod
    def build(cls, models: Mapping[str, nn.Module], config: Config) -> LayerTable:
        """Walk ``models`` (prefix -> module) and keep what the config's filters allow."""
        table = cls()
        table.extend(models, config)
        return table

    def extend(self, models: Mapping[str, nn.Module], config: Config) -> list[ModuleEntry]:
        """Add what ``models`` hold that the table does not yet: a model found later in the run
        (``gradscope run`` discovers models as they first train), or the new parts of one
        already watched under the same prefix. Modules and parameters already watched keep
        their first names. Returns the new module entries (to hook)."""
        from .distributed import clean_name, fsdp1_layout, is_dtensor

        added: list[ModuleEntry] = []
        for prefix, model in models.items():
            names = _names_by_param(model, prefix)
            spans, shapes = fsdp1_layout(model)
            adopted: dict[str, list[ParamSlot]] = {}  # FSDP1 flat: module name -> its slots
            for raw_name, module in model.named_modules():
                raw_name = clean_name(_join(prefix, raw_name))
                module_name = raw_name or ROOT
                if id(module) in self._seen:
                    continue  # a module reachable twice is watched once, under its first name
                self._seen[id(module)] = module
                self._names[id(module)] = module_name
                if not _type_allowed(module, config):
                    continue
                owned = adopted.pop(module_name, [])
                for pname, param in module.named_parameters(recurse=False):
                    full = _join(raw_name, pname)
                    if not param.requires_grad or id(param) in self._by_param:
                        continue
                    if id(param) in spans:  # one slot per original parameter of the unit
                        for slot in self._spans(param, raw_name, spans[id(param)], config):
                            adopted.setdefault(slot.module_name, []).append(slot)
                        owned.extend(adopted.pop(module_name, []))
                        continue
                    if not _name_allowed(full, module_name, config):
                        continue
                    first, *aliases = names[id(param)]
                    slot = ParamSlot(
                        self._new_index(),
                        first,
                        module_name,
                        param,
                        tuple(aliases),
                        shape=shapes.get(id(param)),
                        dtensor=is_dtensor(param),
                    )
                    self.params.append(slot)
                    self._by_param[id(param)] = [slot]
                    owned.append(slot)
                family = activation_family(module, config.activation_types)
                if family is not None and not _name_allowed(module_name, module_name, config):
                    family = None
                if owned or family is not None:
                    is_leaf = next(module.children(), None) is None
                    entry = ModuleEntry(module_name, module, family, bool(owned), is_leaf)
                    self.modules.append(entry)
                    added.append(entry)
            for slots in adopted.values():  # their module was filtered out
                for slot in slots:
                    self.params.remove(slot)
                    self._by_param[id(slot.param)].remove(slot)
        return added

    def _spans(
        self, flat: nn.Parameter, owner: str, spans: list[Any], config: Config
    ) -> list[ParamSlot]:
        """Slots for the original parameters inside an FSDP1 flat parameter."""
        slots = self._by_param.setdefault(id(flat), [])
        out = []
        for fqn, offset, length, shape in spans:
            name = _join(owner, fqn)
            module_name = name.rsplit(".", 1)[0] if "." in name else ROOT
            if not _name_allowed(name, module_name, config):
                continue
            slot = ParamSlot(
                self._new_index(), name, module_name, flat, (), span=(offset, length), shape=shape
            )
            self.params.append(slot)
            slots.append(slot)
            out.append(slot)
        return out

    def contains(self, module: nn.Module) -> bool:
        """Whether ``module`` belongs to a watched model (filtered out or not)."""
        return self._seen.get(id(module)) is module

    def module_name(self, module: nn.Module) -> str | None:
        """The qualified name of a module of a watched model (filtered out or not)."""
        return self._names.get(id(module)) if self.contains(module) else None

    def allows(self, name: str, module_name: str, like: nn.Module, config: Config) -> bool:
        """Whether the filters keep a site ``name`` of module ``module_name`` that behaves like
        the module ``like`` (a functional activation: the types match its module class)."""
        return _type_allowed(like, config) and _name_allowed(name, module_name, config)

    def functional_site(self, site: str) -> FunctionalSite | None:
        """The functional activation behind a site (``conv1:relu`` or ``conv1:relu#k``)."""
        name = site.split("#", 1)[0]
        return next((f for f in self.functional if f.name == name), None)

    def add_functional(self, site: FunctionalSite) -> None:
        """Describe a functional activation site in run.json (right after ``site.after``)."""
        self.functional.append(site)

    def slots_of(self, params: Iterable[torch.Tensor]) -> list[ParamSlot]:
        """The watched slots among ``params`` (an optimizer's), in the table's order, each once."""
        found = {id(s): s for p in params for s in self._by_param.get(id(p), ())}
        return sorted(found.values(), key=lambda s: s.index)

    def mark_executed(self, module_name: str) -> None:
        """Record that ``module_name`` ran (first call wins); gives the forward order."""
        if module_name not in self._order:
            self._order[module_name] = len(self._order)

    def executed_count(self) -> int:
        """How many watched modules have run so far."""
        return len(self._order)

    def describe(self) -> list[dict[str, Any]]:
        """Layer metadata for run.json, in forward order (unexecuted layers last)."""
        rank = {e.name: i for i, e in enumerate(self.modules)}

        def key(module_name: str) -> tuple[int, int]:
            order = self._order.get(module_name)
            return (0, order) if order is not None else (1, rank.get(module_name, len(rank)))

        entries = sorted(self.modules, key=lambda e: key(e.name))
        by_module: dict[str, list[ParamSlot]] = {}
        for slot in self.params:
            by_module.setdefault(slot.module_name, []).append(slot)
        after: dict[str | None, list[FunctionalSite]] = {}
        for site in self.functional:
            after.setdefault(site.after, []).append(site)
        out: list[dict[str, Any]] = [_functional(s) for s in after.pop(None, [])]
        for entry in entries:
            executed = entry.name in self._order
            out.append(
                {
                    "name": entry.name,
                    "kind": "module",
                    "type": type(entry.module).__name__,
                    "family": entry.family.value if entry.family else None,
                    "executed": executed,
                }
            )
            for slot in by_module.get(entry.name, []):
                out.append(
                    {
                        "name": slot.name,
                        "kind": "param",
                        "module": entry.name,
                        "type": type(entry.module).__name__,
                        "shape": list(slot.shape if slot.shape is not None else slot.param.shape),
                        "numel": math.prod(slot.shape)
                        if slot.shape is not None
                        else slot.param.numel(),
                        "aliases": list(slot.aliases),
                        "executed": executed,
                    }
                )
            out.extend(_functional(s) for s in after.pop(entry.name, []))
        out.extend(_functional(s) for sites in after.values() for s in sites)
        return out

    def check_watchable(self, optimizers: Sequence[torch.optim.Optimizer], config: Config) -> None:
        """Something to watch, and optimizers that step it (one-line errors).

        Raises:
            ValueError: Nothing passed the filters, or an optimizer steps none of it.
        """
        if not self.params and not self.modules:
            raise ValueError(
                "nothing to watch: no trainable parameter or activation module passed the "
                f"filters (include={list(config.include)}, exclude={list(config.exclude)}, "
                f"include_types={config.to_json()['include_types']}, "
                f"exclude_types={config.to_json()['exclude_types']})"
            )
        for opt in optimizers:
            if not self.slots_of(p for g in opt.param_groups for p in g["params"]):
                raise ValueError(
                    f"optimizer {type(opt).__name__} steps none of the watched parameters; "
                    "pass the optimizer of this model, or no optimizer to find it automatically"
                )

    # -- queries (the remedies') ---------------------------------------------------------------
    def entry(self, site: str) -> ModuleEntry | None:
        """The watched module of an activation site (``name`` or ``name#k``)."""
        name = site.split("#", 1)[0]
        return next((e for e in self.modules if e.name == name), None)

    def executed_modules(self) -> list[ModuleEntry]:
        """The watched modules that ran, in forward order."""
        ran = [e for e in self.modules if e.name in self._order]
        return sorted(ran, key=lambda e: self._order[e.name])

    def last_layer_params(self) -> set[int]:
        """Ids of the parameters of the last module (in forward order) that ran and owns
        watched parameters: the classifier that AGC leaves out. Empty before any forward."""
        owners = {slot.module_name for slot in self.params}
        for e in reversed(self.executed_modules()):
            if e.name in owners:
                return {id(s.param) for s in self.params if s.module_name == e.name}
        return set()

    def neighbours(
        self, name: str, passthrough: tuple[type[nn.Module], ...] = ()
    ) -> tuple[nn.Module | None, list[nn.Module], nn.Module | None]:
        """Around the module ``name``, in forward order: the nearest leaf module before it that
        owns parameters (skipping over ``passthrough`` types, listed as in between), those in
        between, and the nearest such leaf after it."""
        order = self.executed_modules()
        names = [e.name for e in order]
        if name not in names:
            return None, [], None
        i = names.index(name)
        producer = consumer = None
        between: list[nn.Module] = []
        for e in reversed(order[:i]):
            if e.owns_params and e.is_leaf:
                if isinstance(e.module, passthrough):
                    between.append(e.module)
                    continue
                producer = e.module
                break
        for e in order[i + 1 :]:
            if e.owns_params and e.is_leaf:
                consumer = e.module
                break
        return producer, between, consumer

    def release(self) -> None:
        """Drop every reference to the user's parameters and modules."""
        self.params.clear()
        self.modules.clear()
        self._by_param.clear()
        self._seen.clear()
        self._names.clear()


def _functional(site: FunctionalSite) -> dict[str, Any]:
    """run.json's entry of a functional activation site (a module entry that says so)."""
    return {
        "name": site.name,
        "kind": "module",
        "type": site.type,
        "family": site.family.value,
        "executed": True,
        "functional": site.label,
        "anchor": site.anchor,
        "within": site.within,
    }


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _names_by_param(model: nn.Module, prefix: str) -> dict[int, list[str]]:
    """Every qualified name of every parameter; tied parameters get several."""
    names: dict[int, list[str]] = {}
    from .distributed import clean_name

    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(clean_name(_join(prefix, name)))
    return names


def _type_allowed(module: nn.Module, config: Config) -> bool:
    if config.include_types and not type_matches(module, config.include_types):
        return False
    return not (config.exclude_types and type_matches(module, config.exclude_types))


def _name_allowed(name: str, module_name: str, config: Config) -> bool:
    """Include/exclude globs match a parameter's own name or its module's name."""

    def matches(patterns: tuple[str, ...]) -> bool:
        return any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns
        )

    if config.include and not matches(config.include):
        return False
    return not (config.exclude and matches(config.exclude))
