"""Swapping activation modules: before training, or on a finding while gradscope watches.

A module is replaced *on its parent* (every parent that holds the instance: a shared
``self.act = nn.ReLU()`` used after several layers is one instance, so all its uses change
together, and the event says how many parents held it). Only modules are swappable: an
activation called functionally inside ``forward`` (``F.relu(x)``, ``x.relu()``) has no module to
replace, and gradscope says so rather than doing nothing silently.

A compiled model (``torch.compile``) sees the new module on its next call: dynamo guards on the
submodules it traced, the guard fails and the graph is recompiled once (tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FUNCTIONAL_NOTE = (
    "activations called functionally inside forward() (F.relu(x), torch.sigmoid(x)) have no "
    "module to replace and cannot be swapped; use nn.ReLU()-style modules"
)


def parents_of(root: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` under ``root`` that holds ``target``."""
    out: list[tuple[nn.Module, str]] = []
    for module in root.modules():
        for name, child in module._modules.items():
            if child is target:
                out.append((module, name))
    return out


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Put ``new`` wherever ``old`` is held under ``root``; returns the number of places.
    ``new`` is moved to ``old``'s device/dtype (parameters of PReLU-like targets) and keeps
    its training mode."""
    places = parents_of(root, old)
    tensors: list[torch.Tensor] = [*old.parameters(), *old.buffers()]
    if tensors:
        new.to(device=tensors[0].device)
    new.train(old.training)
    for parent, name in places:
        parent._modules[name] = new
    return len(places)


def swap_activations(
    model: nn.Module,
    source: type[nn.Module] | tuple[type[nn.Module], ...],
    factory: Callable[[], nn.Module] | Callable[[nn.Module], nn.Module],
) -> list[str]:
    """Replace every module of type ``source`` in ``model`` with ``factory()`` (or
    ``factory(old_module)`` if it takes one argument); returns the replaced modules' names.

    Use it before training (``gradscope.swap_activations(model, nn.ReLU, lambda:
    nn.LeakyReLU(0.01))``), or let ``watch(model, swap="relu->leaky_relu:0.01")`` do it on a
    finding. Exact types are matched (a subclass is user code, matched only if named).

    Raises:
        TypeError: ``model`` is not a module, ``source`` not a module class, or ``factory``
            does not return a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_activations: model={type(model).__name__} is not an nn.Module")
    types = source if isinstance(source, tuple) else (source,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                f"swap_activations: source={t!r} is not an nn.Module class (e.g. nn.ReLU)"
            )
    if not callable(factory):
        raise TypeError(f"swap_activations: factory={factory!r} is not callable")
    targets = [(name, m) for name, m in model.named_modules() if type(m) in types and name]
    swapped: list[str] = []
    done: dict[int, nn.Module] = {}
    for name, old in targets:
        if id(old) in done:
            continue
        new = _call_factory(factory, old)
        if not isinstance(new, nn.Module):
            raise TypeError(
                f"swap_activations: factory returned {type(new).__name__}, expected an nn.Module"
            )
        replace_module(model, old, new)
        done[id(old)] = new
        swapped.append(name)
    if not swapped:
        names = ", ".join(t.__name__ for t in types)
        warnings.warn(
            f"swap_activations: no {names} module in {type(model).__name__}; " + FUNCTIONAL_NOTE,
            UserWarning,
            stacklevel=2,
        )
    return swapped


def _call_factory(factory: Callable[..., nn.Module], old: nn.Module) -> Any:
    import inspect

    try:
        sig = inspect.signature(factory)
        takes_arg = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in sig.parameters.values()
        )
    except (TypeError, ValueError):  # builtins / classes without a signature
        takes_arg = False
    if isinstance(factory, type):  # a module class: construct with defaults
        return factory()
    return factory(old) if takes_arg else factory()
