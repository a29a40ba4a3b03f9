"""Healthy baseline: a ReLU MLP classifier trained with Adam (lr 1e-3) on synthetic data.

Standard good practice: PyTorch's default init (Kaiming-uniform weights), two hidden layers of
128 ReLU units, Adam with lr 1e-3, minibatches of 128 drawn from a fixed data set of 2048
examples (8 Gaussian clusters in 20-D, one class each, with overlap). The loss falls steadily, no
unit dies, nothing is non-finite, and the gradient norm varies smoothly. (Adam's update:weight
ratio is ~1e-2 at lr 1e-3 on layers this size, above CS231n's ~1e-3 rule of thumb; that is
normal for Adam: docs/findings.md, `vanishing_gradients`.)

What gradscope should report:
    nothing: no vanishing/exploding gradients, no spike, no dead or saturated units, no NaN/Inf.

Ground truth printed by this script: loss and accuracy at the start and end, the largest dead
fraction of any ReLU on the training batches (checked at steps 0 and last), the ratio of the
largest to the median total grad norm, and that everything stayed finite.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 200
LR = 1e-3
BATCH = 128
N_EXAMPLES = 2048
IN_FEATURES = 20
CLASSES = 8


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one per class, with some overlap."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.6 * torch.randn(CLASSES, IN_FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (N_EXAMPLES,), generator=g)
    x = centers[y] + torch.randn(N_EXAMPLES, IN_FEATURES, generator=g)
    return x, y


def replay(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Ground truth only: logits and dead fraction per ReLU (output 0 for every example in
    ``x``), replayed functionally from a parameter snapshot (no module hook fires)."""
    dead: dict[str, float] = {}
    h = x
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.Linear):
                h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            else:
                h = torch.relu(h)
                dead[name] = (h <= 0).all(dim=0).float().mean().item()
    return h, dead


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x_all, y_all = make_data(seed)
    sampler = torch.Generator().manual_seed(seed + 1)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    losses: list[float] = []
    grad_norms: list[float] = []
    finite = True
    first_batch = last_batch = x_all[:BATCH]
    for step in range(steps):
        idx = torch.randint(0, N_EXAMPLES, (BATCH,), generator=sampler)
        x, y = x_all[idx], y_all[idx]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        finite = finite and math.isfinite(loss.item()) and math.isfinite(grad_norms[-1])
        losses.append(loss.item())
        optimizer.step()
        if step == 0:
            first_batch = x
        last_batch = x
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {grad_norms[-1]:.3f}")

    final = model.state_dict()
    dead = {f"{k}@0": v for k, v in replay(model, initial, first_batch)[1].items()}
    dead.update({f"{k}@end": v for k, v in replay(model, final, last_batch)[1].items()})
    accuracy = {
        when: (replay(model, state, x_all)[0].argmax(1) == y_all).float().mean().item()
        for when, state in (("start", initial), ("end", final))
    }
    g = torch.tensor(grad_norms)
    truth = {
        "loss_first": losses[0],
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "accuracy_start": accuracy["start"],
        "accuracy_end": accuracy["end"],
        "max_dead_fraction": max(dead.values()),
        "max_over_median_grad_norm": (g.max() / g.median()).item(),
        "all_finite": int(finite),
    }
    print(
        f"loss {truth['loss_first']:.3f} at step 0 -> {truth['loss_last10']:.3f} (mean of the "
        f"last 10 steps); accuracy {accuracy['start']:.1%} -> {accuracy['end']:.1%}"
    )
    print(
        "dead fraction per ReLU on the training batch (step 0 / last step): "
        + " ".join(f"{k}:{v:.1%}" for k, v in dead.items())
    )
    print(
        f"max/median total grad norm: {truth['max_over_median_grad_norm']:.2f}; all finite: "
        f"{finite}"
    )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
