"""Dead-unit recycling, ReDo-style (Sokar et al. 2023; dopamine's ``NeuronRecycler``).

For each dead unit of an activation: its incoming weights (the producing Linear/Conv row or
filter) are re-drawn from the layer's default initialisation, its bias set to 0, its outgoing
weights (the consuming layer's column or input channel) set to 0, and the optimizer state of
every touched weight (Adam's moments, SGD's momentum) zeroed for those entries. The zero
outgoing weights mean the network's output is unchanged at the moment of recycling (measured:
exactly 0.0 difference; docs/remedies.md, "Dead-unit recycling"); the unit then gets gradients
again.

The producer and consumer are found from the forward order: the nearest Linear/Conv that ran
before the activation and the nearest after it, with only per-unit layers (BatchNorm,
LayerNorm, Dropout) allowed in between, and shapes that agree. Anything else (a residual
branch, attention, a reshape that mixes units) is left alone and the event says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

Index = tuple[Union[slice, torch.Tensor], ...]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PER_UNIT = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)


@dataclass
class Plan:
    """Where a site's units come from and go to."""

    producer: nn.Module
    consumer: nn.Module
    between: list[nn.Module]
    units: int
    per_unit_cols: int  # consumer input columns per unit (>1 after a conv -> flatten)


def out_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels
    return None


def make_plan(
    producer: nn.Module | None, consumer: nn.Module | None, between: Sequence[nn.Module], units: int
) -> Plan | str:
    """A recycling plan, or the reason there is none."""
    if producer is None or not isinstance(producer, _PRODUCERS):
        return "no Linear/Conv layer feeds this activation directly"
    if consumer is None or not isinstance(consumer, _PRODUCERS):
        return "no Linear/Conv layer reads this activation directly (e.g. it is the output)"
    if out_units(producer) != units:
        return f"the layer before has {out_units(producer)} outputs, the activation {units} units"
    for m in between:
        if not isinstance(m, _PER_UNIT):
            return f"{type(m).__name__} sits between the layers (not a per-unit layer)"
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) != (units,):
            return "a LayerNorm over more than the units sits between the layers"
    if isinstance(consumer, nn.Linear):
        cols = consumer.in_features
    else:
        if consumer.groups != 1:
            return "the next layer is a grouped convolution"
        cols = consumer.in_channels
    if cols == units:
        return Plan(producer, consumer, list(between), units, 1)
    if (
        isinstance(consumer, nn.Linear)
        and not isinstance(producer, nn.Linear)
        and cols % units == 0
    ):
        return Plan(producer, consumer, list(between), units, cols // units)  # conv -> flatten
    return f"the next layer reads {cols} inputs, the activation has {units} units"


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


@torch.no_grad()
def recycle(
    plan: Plan,
    dead: torch.Tensor,
    optimizers: Sequence[torch.optim.Optimizer],
    generator: torch.Generator | None = None,
) -> int:
    """Recycle units ``dead`` (long indices); returns how many."""
    if dead.numel() == 0:
        return 0
    w = _tensor(plan.producer, "weight")
    cw = _tensor(plan.consumer, "weight")
    if w is None or cw is None:
        return 0
    dead = dead.to(w.device)
    fresh = torch.empty_like(w)
    _default_init(fresh, generator)
    w[dead] = fresh[dead]
    touched: list[tuple[torch.Tensor, Index]] = [(w, (dead,))]
    bias = _tensor(plan.producer, "bias")
    if bias is not None:
        bias[dead] = 0
        touched.append((bias, (dead,)))
    for m in plan.between:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                t = _tensor(m, name)
                if t is not None:
                    t[dead] = value
                    touched.append((t, (dead,)))
            mean, var = _tensor(m, "running_mean"), _tensor(m, "running_var")
            if mean is not None and var is not None:
                mean[dead] = 0
                var[dead] = 1
    if plan.per_unit_cols == 1:
        cols = dead
    else:  # conv channels flattened: channel c is columns [c*k, (c+1)*k)
        k = plan.per_unit_cols
        cols = (dead.unsqueeze(1) * k + torch.arange(k, device=dead.device)).reshape(-1)
    index: Index = (slice(None), cols.to(cw.device))
    cw[index] = 0
    touched.append((cw, index))
    for opt in optimizers:
        for p, idx in touched:
            state = opt.state.get(p)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value[idx] = 0
    return int(dead.numel())


def _default_init(t: torch.Tensor, generator: torch.Generator | None) -> None:
    """nn.Linear / nn.ConvNd's own default (kaiming_uniform_ with a = sqrt(5))."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
