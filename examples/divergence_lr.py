"""Divergence from a too-large learning rate: least squares, N(0, 10^2) features, SGD lr 0.1.

Gradient descent on least squares is stable only if lr < 2 / lambda_max of the Hessian
(2/n) X^T X. With features of standard deviation 10, lambda_max ~ 2 * 100 * (1 + sqrt(d/n))^2
(377 for seed 0: lr must be < 0.0053), so lr 0.1 is ~19x past the edge: every step multiplies
the error along the top eigenvector by |1 - lr * lambda_max| ~ 37, the loss grows ~1000x per
step, the gradients ~30x per step, and float32 overflows. The project's measurement of this
setup (docs/findings.md, "Where NaN and Inf come from"): finite loss until step 11 (7.0e34),
inf at step 12, NaN from step 25; here the same steps (loss 2.4e36 at step 11).

What gradscope should report:
    divergence / exploding gradients at linear (nn.Linear; linear.weight, linear.bias) from the
        first steps: loss and grad norm growing geometrically (~1000x and ~30x per step) from
        step 1, update:weight ratio far above 1;
    non-finite: the float32 norm of linear.weight's gradient overflows to inf at step 11
        (its elements are still finite, ~1e18); loss inf at step 12 (the model output is
        still finite: the square overflows inside mse_loss); gradient elements and the model
        output non-finite from step 24 (seed 0; 24 or 25 for seeds 1/2); loss NaN from step 25.
    Seeds 0/1/2 all give grad-norm inf at 11, loss inf at 12, loss NaN at 25.

Ground truth printed by this script: the loss history (every step until it is NaN), the grad norm
of linear.weight per step, the first step with an inf loss, the first with a NaN loss, the first
whose float32 grad norm is inf, the first with non-finite gradient elements and the first with a
non-finite model output.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 40
LR = 0.1
N_EXAMPLES = 64
IN_FEATURES = 10
FEATURE_STD = 10.0


class LinearRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(IN_FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_model() -> nn.Module:
    return LinearRegression()


T = TypeVar("T")


def first(values: list[T], test: Callable[[T], bool]) -> int:
    """Index of the first value passing ``test``, -1 if none."""
    return next((i for i, v in enumerate(values) if test(v)), -1)


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(seed)
    x = FEATURE_STD * torch.randn(N_EXAMPLES, IN_FEATURES, generator=data)
    w_true = torch.randn(IN_FEATURES, 1, generator=data)
    y = x @ w_true + 0.1 * torch.randn(N_EXAMPLES, 1, generator=data)

    losses: list[float] = []
    grad_norms: list[float] = []
    grad_finite: list[bool] = []
    out_finite: list[bool] = []
    for _step in range(steps):
        optimizer.zero_grad()
        out = model(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        grad_norms.append(model.get_parameter("linear.weight").grad.norm().item())
        grad_finite.append(all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()))
        out_finite.append(bool(torch.isfinite(out).all()))

    first_inf = first(losses, math.isinf)
    first_nan = first(losses, math.isnan)
    truth = {
        "loss_step0": losses[0],
        "last_finite_loss": max((v for v in losses if math.isfinite(v)), default=math.nan),
        "first_inf_loss_step": first_inf,
        "first_nan_loss_step": first_nan,
        "first_inf_grad_norm_step": first(grad_norms, math.isinf),
        "first_nonfinite_grad_step": first(grad_finite, lambda ok: not ok),
        "first_nonfinite_output_step": first(out_finite, lambda ok: not ok),
    }
    shown = losses if first_nan < 0 else losses[: first_nan + 1]
    print("loss per step: " + " ".join(f"{i}:{v:.2g}" for i, v in enumerate(shown)))
    print(
        "|grad linear.weight| per step: "
        + " ".join(f"{i}:{v:.2g}" for i, v in enumerate(grad_norms[: len(shown)]))
    )
    print(f"first inf loss at step {first_inf}, first NaN loss at step {first_nan}")
    print(
        f"float32 grad norm of linear.weight overflows to inf at step "
        f"{truth['first_inf_grad_norm_step']}; first gradient with non-finite elements at step "
        f"{truth['first_nonfinite_grad_step']}; first non-finite model output at step "
        f"{truth['first_nonfinite_output_step']}"
    )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
