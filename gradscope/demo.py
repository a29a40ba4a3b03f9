"""``gradscope demo``: train a small, deliberately deep sigmoid network and watch it.

A 6-layer sigmoid MLP on a synthetic two-spirals problem: the textbook vanishing-gradient case
(Glorot & Bengio 2010), so the per-layer gradient norms visibly shrink from the output layer to
the input layer. Everything is generated locally; it runs in a few seconds on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradscope


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals, ``n`` points each: inputs ``[2n, 2]``, labels ``[2n]``."""
    t = torch.rand(n, generator=generator) * 3 * math.pi + 0.5
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 10
    x = torch.cat([arm, -arm]) + 0.02 * torch.randn(2 * n, 2, generator=generator)
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return x, y


def deep_sigmoid_mlp(depth: int = 6, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(2, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def run(
    out: Path | str = "reports", steps: int = 300, name: str | None = None, **options: Any
) -> Path:
    """Train the demo network under gradscope; returns the run directory. ``options``: more
    ``watch`` options (the CLI's remedy flags)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = spirals(256, gen)
    model = deep_sigmoid_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # quiet: `gradscope demo` prints the findings once, in the summary that follows
    with gradscope.watch(
        model, out=out, name=name or gradscope_name(), quiet=True, **options
    ) as scope:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return scope.run_dir


def gradscope_name() -> str:
    from .rundir import default_name

    return default_name("demo")
