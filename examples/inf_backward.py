"""Inf created in the backward pass: a hand-written L2 norm, sqrt(sum x^2), of an all-zero row.

The forward pass of sqrt at 0 is a harmless 0, but its derivative 1 / (2 sqrt(u)) is +inf at
u = 0 (docs/findings.md, "Where NaN and Inf come from": sqrt at 0 gives an inf gradient). Here
a regressor appends each embedding's Euclidean length, computed by a custom ``Magnitude`` module as
``(h * h).sum(-1).sqrt()``, to the embedding. At step 30 the batch contains one all-zero
feature row (a missing record filled with zeros); the bias-free embedding maps it to h = 0, so
the module's forward output is 0 and the LOSS IS FINITE, but in backward the sqrt's gradient is
inf and the chain rule multiplies it by d(h*h)/dh = 2h = 0: inf * 0 = NaN in the gradient
w.r.t. the module's input, and embed.weight.grad is NaN. ``torch.autograd.detect_anomaly``
misses the all-inf case (it checks backward outputs for NaN only; docs/comparison.md).
``torch.linalg.vector_norm`` back-propagates 0 at a zero vector and is the fix. The update at
step 30 writes NaN into embed.weight, so from step 31 the forward pass is NaN as well.

What gradscope should report:
    non-finite gradient at step 30 while the loss is finite: created in the backward of norm
        (Magnitude, custom module; the gradient w.r.t. its input is NaN while the gradient
        w.r.t. its output is finite), landing in embed.weight (nn.Linear embed) as NaN;
        head.* gradients finite at step 30.
    from step 31: NaN loss and NaN in every module output, starting with embed.
    nothing before step 30: steps 0-29 are finite and healthy.
    Seed-independent: the zero row is always at step 30.

    (gradscope names the module at the first occurrence with trace_nonfinite='always'; with
    the default 'auto' it reports the step and the backward pass, armed too late to trace a
    one-off whose NaN weights leave nothing to trace afterwards.)

Ground truth printed by this script: the first step whose loss was finite but some gradient was
non-finite, which parameters' gradients were non-finite there, and, replaying that step's
forward and backward passes from the weights it used, the gradient w.r.t. the output and the
input of each module (backward order) and the first module whose input gradient is non-finite.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 60
LR = 1e-2
BATCH = 64
IN_FEATURES = 16
EMBED = 32
ZERO_ROW_STEP = 30


def sum_of_squares(h: torch.Tensor) -> torch.Tensor:
    return (h * h).sum(dim=-1, keepdim=True)


def magnitude(h: torch.Tensor) -> torch.Tensor:
    """[h, ||h||] with the norm written by hand as sqrt(sum h^2)."""
    return torch.cat([h, sum_of_squares(h).sqrt()], dim=-1)


class Magnitude(nn.Module):
    """Custom module: append each row's Euclidean length."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return magnitude(h)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, EMBED, bias=False)
        self.norm = Magnitude()
        self.head = nn.Sequential(nn.Linear(EMBED + 1, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def build_model() -> nn.Module:
    return Regressor()


def make_batch(
    step: int, data: torch.Generator, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, IN_FEATURES, generator=data)
    if step == ZERO_ROW_STEP:
        x[7] = 0.0  # one missing record, zero-filled
    y = torch.tanh(x @ teacher) + 0.1 * x.norm(dim=1, keepdim=True)
    return x, y


def replay_grads(
    state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, torch.Tensor, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Ground truth only: replay one step functionally from a parameter snapshot (no module
    hook fires, no .grad is touched) and return the loss, the gradient w.r.t. the sum of squares
    inside ``norm`` and, per module in backward order, (name, gradient w.r.t. its output,
    gradient w.r.t. its input)."""
    w = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    h_embed = F.linear(x, w["embed.weight"])
    u = sum_of_squares(h_embed)  # inside norm: exactly as magnitude() computes it
    h_norm = torch.cat([h_embed, u.sqrt()], dim=-1)
    h0 = F.linear(h_norm, w["head.0.weight"], w["head.0.bias"])
    h1 = torch.relu(h0)
    out = F.linear(h1, w["head.2.weight"], w["head.2.bias"])
    loss = F.mse_loss(out, y)
    g_out, g1, g0, g_norm, g_u, g_embed = torch.autograd.grad(
        loss, [out, h1, h0, h_norm, u, h_embed]
    )
    modules = [
        ("head.2", g_out, g1),
        ("head.1", g1, g0),
        ("head.0", g0, g_norm),
        ("norm", g_norm, g_embed),
        ("embed", g_embed, torch.zeros(0)),  # its input is the data: no gradient
    ]
    return loss.item(), g_u, modules


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_FEATURES, 1, generator=data)

    first_bad = -1
    bad_params: dict[str, int] = {}
    bad: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None
    for step in range(steps):
        x, y = make_batch(step, data, teacher)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if first_bad < 0 and math.isfinite(loss.item()):
            counts = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()}
            nonfinite = {n: c for n, c in counts.items() if c}
            if nonfinite:
                first_bad, bad_params, bad = step, nonfinite, (before, x, y)
        optimizer.step()
        if step % 10 == 0 or step in (first_bad, first_bad + 1):
            print(f"step {step:4d}  loss {loss.item():.4g}")

    truth: dict[str, float] = {"first_finite_loss_nonfinite_grad_step": first_bad}
    if bad is None:
        print("no step had a finite loss and a non-finite gradient")
        return truth
    replay_loss, g_u, modules = replay_grads(*bad)
    culprit = next(n for n, _, g_in in modules if not bool(torch.isfinite(g_in).all()))
    truth["loss_at_that_step"] = replay_loss
    truth["nonfinite_param_grads"] = len(bad_params)
    truth["nonfinite_embed_weight_grad_elements"] = bad_params.get("embed.weight", 0)
    truth["inf_grads_inside_norm"] = int(torch.isinf(g_u).sum())
    print(
        f"step {first_bad}: loss {replay_loss:.4g} (finite), non-finite gradient elements: "
        f"{bad_params}"
    )
    for name, g_out, g_in in modules:

        def describe(g: torch.Tensor) -> str:
            if g.numel() == 0:
                return "-"
            return (
                f"{int(torch.isinf(g).sum())} inf, {int(torch.isnan(g).sum())} NaN of {g.numel()}"
            )

        print(
            f"  {name:7s} grad w.r.t. output: {describe(g_out):22s} "
            f"grad w.r.t. input: {describe(g_in)}"
        )
    print(
        f"inside norm: dL/d(sum of squares) has {truth['inf_grads_inside_norm']} inf "
        "(sqrt'(0) = inf), times d(h*h)/dh = 0 -> NaN"
    )
    print(f"first module (backward order) whose input gradient is non-finite: {culprit}")
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
