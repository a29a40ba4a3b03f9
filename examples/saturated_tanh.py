"""Saturated tanh units: N(0, 1) weights on width 256 drive almost every tanh to +-1.

Glorot & Bengio (2010, sec. 3.2, Fig. 3) watched tanh layers saturate one after another and
argued for keeping Var[W] ~ 1/n (their normalised init, Var[W] = 2/(n_in + n_out), eq. 16).
Here the weights are drawn from N(0, 1) instead, n Var[W] = 256 for the hidden layers: a
pre-activation is a sum of 256 terms of size ~1 and has std ~16, so nearly every tanh output
sits at |y| > 0.99 where tanh'(s) = 1 - y^2 < 0.02. The local gradient through each saturated
unit is almost zero and training (Adam, lr 1e-3, 100 steps) cannot pull the layers out:
saturation stays at its initial level for the whole run, while the linear head fits the task on
top of the frozen +-1 features (the loss does fall).

Network: 64 -> 256 -> 256 -> 256 -> 10, Tanh after each hidden Linear, weights N(0, 1),
biases 0, a fixed synthetic 10-class task.

What gradscope should report:
    saturation at 3 and 5 (nn.Tanh, hidden layers 2 and 3): ~86% of outputs with |y| > 0.99
        from step 0 to the end (pre-activation std ~15); at 1 (nn.Tanh, first layer; fan-in 64,
        pre-activation std ~8) ~74%, also from step 0 to the end;
    no NaN/Inf, no dead units, no gradient spike.

Ground truth printed by this script: the fraction of tanh outputs with |y| > 0.99 for each Tanh
module, at step 0 and after training, plus the std of each hidden pre-activation at step 0.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 100
LR = 1e-3
WIDTH = 256
IN_FEATURES = 64
CLASSES = 10
N_EXAMPLES = 256
THRESHOLD = 0.99


def build_model() -> nn.Module:
    """64 -> 256 -> 256 -> 256 -> 10 tanh MLP with N(0, 1) weights and zero biases."""
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, WIDTH),
        nn.Tanh(),
        nn.Linear(WIDTH, WIDTH),
        nn.Tanh(),
        nn.Linear(WIDTH, WIDTH),
        nn.Tanh(),
        nn.Linear(WIDTH, CLASSES),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, mean=0.0, std=1.0)
            nn.init.zeros_(layer.bias)
    return model


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def tanh_stats(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """Ground truth only: (saturated fraction, pre-activation std) of every Tanh, replayed
    functionally from a parameter snapshot (no module hook fires)."""
    out: dict[str, tuple[float, float]] = {}
    h = x
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.Linear):
                h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            else:
                pre = h
                h = torch.tanh(pre)
                out[name] = ((h.abs() > THRESHOLD).float().mean().item(), pre.std().item())
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

    start = tanh_stats(model, initial, x)
    end = tanh_stats(model, model.state_dict(), x)
    truth: dict[str, float] = {}
    for name in start:
        truth[f"saturated_{name}_start"] = start[name][0]
        truth[f"saturated_{name}_end"] = end[name][0]
        truth[f"preact_std_{name}_start"] = start[name][1]
        print(
            f"Tanh {name}: |y| > {THRESHOLD} for {start[name][0]:.1%} of outputs at step 0, "
            f"{end[name][0]:.1%} after {steps} steps (pre-activation std at step 0: "
            f"{start[name][1]:.1f})"
        )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
