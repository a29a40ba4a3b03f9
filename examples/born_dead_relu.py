"""Born dead: a deep, narrow ReLU network that is dead at initialisation (Lu et al. 2019).

Lu, Shin, Su & Karniadakis ("Dying ReLU and initialization", arXiv:1903.06733, CiCP 2020):
"a deep ReLU network will eventually die in probability as the depth goes to infinite", and
deep narrow nets collapse to the mean or median of the target. With symmetric (He) weights and
zero biases, a width-2 layer zeroes both units for every input with non-negligible probability,
and once one layer outputs 0 for all inputs nothing below it gets any gradient. The project's
Monte Carlo (docs/findings.md, `dead_units`; 1-D input, He-normal weights, zero biases) gives
P(born dead) = 0.909 for width 2 and depth 10, this script's network.

Network: 1 -> [Linear(., 2) + ReLU] x 10 -> Linear(2, 1), He-normal weights, zero biases,
regression of y = |x| on x in [-sqrt 3, sqrt 3]; Adam lr 1e-2. For seed 0 the second ReLU (3)
is already 0 for every input at step 0, so every layer after it outputs a constant 0, every
gradient except the output bias's is exactly zero, and the network can only learn that bias:
it collapses to predicting the mean of y (Lu et al.'s "erroneous mean state").
Seeds 0-5 are all born dead (first dead ReLU: 3, 13, 19, 7, 15, 11).

What gradscope should report:
    dead units at 3 (nn.ReLU): 100% of units dead from step 0 for the whole run (and so every
        later ReLU: 5, 7, ..., 19, also 100% dead);
    zero gradients (vanishing, exactly 0) for every parameter except 20.bias from step 0:
        0.weight, 0.bias, 2.weight, ..., 18.bias, 20.weight all have grad norm 0.
    no NaN/Inf.

Ground truth printed by this script: the first ReLU (forward order) that outputs 0 for all
inputs at step 0, the dead fraction of every ReLU at step 0, the fraction of parameter tensors
(and of scalar parameters) whose gradient is all zero at step 0, and the range of the
predictions after training (0 = constant output) against the mean of y.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 200
WIDTH = 2
DEPTH = 10  # hidden Linear+ReLU pairs
LR = 1e-2


def build_model() -> nn.Module:
    """1 -> 10 x (Linear(., 2), ReLU) -> Linear(2, 1), He-normal weights, zero biases."""
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(1 if i == 0 else WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 1))
    model = nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


def replay(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Ground truth only: every layer's output, replayed functionally from a parameter snapshot
    (F.linear / torch.relu on copies of the weights, so no module hook fires)."""
    outs: dict[str, torch.Tensor] = {}
    h = x
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.Linear):
                h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            else:
                h = torch.relu(h)
            outs[name] = h
    return outs


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x = torch.linspace(-(3**0.5), 3**0.5, 256).unsqueeze(1)
    y = x.abs()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    zero_grad0: dict[str, bool] = {}
    n_scalars0 = 0
    for step in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if step == 0:
            zero_grad0 = {n: bool((p.grad == 0).all()) for n, p in model.named_parameters()}
            n_scalars0 = sum(int((p.grad == 0).sum()) for p in model.parameters())
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    relus = [n for n, m in model.named_children() if isinstance(m, nn.ReLU)]
    at_init = replay(model, initial, x)
    dead0 = {n: (at_init[n] <= 0).all(dim=0).float().mean().item() for n in relus}
    first_dead = next((n for n, f in dead0.items() if f == 1.0), None)
    n_params = sum(p.numel() for p in model.parameters())
    pred_end = replay(model, model.state_dict(), x)[str(len(model) - 1)]
    truth = {
        "first_dead_relu": int(first_dead) if first_dead is not None else -1,
        "dead_relus_at_step0": sum(f == 1.0 for f in dead0.values()),
        "zero_grad_tensor_fraction": sum(zero_grad0.values()) / len(zero_grad0),
        "zero_grad_scalar_fraction": n_scalars0 / n_params,
        "pred_range_end": (pred_end.max() - pred_end.min()).item(),
        "pred_mean_end": pred_end.mean().item(),
        "target_mean": y.mean().item(),
    }
    print("dead fraction per ReLU at step 0: " + " ".join(f"{n}:{f:.0%}" for n, f in dead0.items()))
    print(f"first ReLU dead for all inputs at step 0: {first_dead}")
    nonzero = [n for n, z in zero_grad0.items() if not z]
    print(
        f"parameters with all-zero gradient at step 0: {sum(zero_grad0.values())}/"
        f"{len(zero_grad0)} tensors ({truth['zero_grad_tensor_fraction']:.1%}), "
        f"{n_scalars0}/{n_params} scalars; non-zero: {nonzero}"
    )
    print(
        f"after {steps} steps: predictions max - min {truth['pred_range_end']:.1e}, mean "
        f"{truth['pred_mean_end']:.4f} vs mean of y {truth['target_mean']:.4f} "
        "(collapsed to the mean)"
    )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
