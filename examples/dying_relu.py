"""Dying ReLU units: Adam with a far too large learning rate (0.1) kills most hidden units.

A ReLU unit is dead when its pre-activation is negative for every input: it outputs 0, its
incoming weights and bias get exactly zero gradient, and nothing can revive it (Lu et al. 2019:
a unit that is "inactive and only output[s] 0 for any input"). A large step that pushes a
unit's bias/weights far negative does exactly that. Adam moves every coordinate by about lr per
step regardless of the gradient's size, so with lr = 0.1 a few steps are enough to push many
units off the data; the project's measurement on this kind of net: Adam lr 0.1 -> 90-95% of
layer-2 units dead after 100 steps, lr 1e-3 -> 0-2% (docs/findings.md, `dead_units`).

Network: 100 -> 256 -> 256 -> 10, ReLU after each hidden Linear, PyTorch default init, a fixed
synthetic 10-class task (labels from a random linear teacher).

What gradscope should report:
    dead units at 3 (nn.ReLU, the second hidden layer): 0% dead at step 0, >50% by step ~3-6,
        ~80% at the end (seeds 0/1/2: 82/79/85%);
    the learning rate is the cause: update:weight ratios far above the CS231n ~1e-3 band
        from step 0 (Adam's first step moves every weight by ~lr = 0.1), and a burst of large
        gradient norms while the layer is being wrecked (seed 0: total grad norm 0.28 at step
        0, 65 at step 1, 9-31 at steps 2-6, ~1 from step ~9; run median ~0.5).
    1 (nn.ReLU, first hidden layer) stays alive (0% dead). No NaN/Inf.

Ground truth printed by this script: the fraction of dead units (output 0 for every example in
the data set) of each ReLU module at step 0 and at the end of training.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 100
LR = 0.1
N_EXAMPLES = 512
IN_FEATURES = 100
CLASSES = 10


def build_model() -> nn.Module:
    """100 -> 256 -> 256 -> 10 ReLU MLP, default init."""
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, CLASSES),
    )


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs, labels = argmax of a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def dead_fractions(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, float]:
    """Ground truth only: dead fraction of every ReLU module, replayed functionally from a
    parameter snapshot (no module hook fires). Dead = output 0 for every example in ``x``."""
    out: dict[str, float] = {}
    h = x
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.Linear):
                h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            else:
                h = torch.relu(h)
                out[name] = (h <= 0).all(dim=0).float().mean().item()
    return out


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = make_data(seed)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for step in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    start = dead_fractions(model, initial, x)
    end = dead_fractions(model, model.state_dict(), x)
    truth: dict[str, float] = {}
    for name in start:
        truth[f"dead_{name}_start"] = start[name]
        truth[f"dead_{name}_end"] = end[name]
        print(
            f"ReLU {name}: dead fraction {start[name]:.1%} at step 0 -> "
            f"{end[name]:.1%} after {steps} steps"
        )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
