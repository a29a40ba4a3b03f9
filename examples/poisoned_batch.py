"""One poisoned batch: a single batch whose inputs arrive 1000x too large (wrong units).

A healthy ReLU MLP regressor trains with Adam (lr 1e-3) on fresh synthetic batches; at step 120
one batch arrives with its features scaled by 1000 (think millimetres instead of metres). For
that one step the loss jumps ~1e6x and the weight-gradient norms ~1e6x (biases ~1e3x) above
their running history, the kind of isolated spike that adaptive clipping (ZClip's z-score > 2.5,
SPAM's spike score > 50, AutoClip's percentile; docs/remedies.md, Clipping) is built to catch.
Adam bounds the step itself (|update| ~ lr per coordinate), so the run absorbs it: everything
stays finite and no unit dies. It is not free, though: Adam's first moment carries the spike's
direction for ~10 more steps and its second moment remembers it for ~1/(1 - beta2) = 1000
steps, so the loss drifts up from ~0.28 to ~0.57 and the hit weights nearly stop moving
(net.0.weight's update:weight ratio falls from ~2e-3 before the spike to ~6e-6 after it) -- the
effect SPAM's momentum reset targets (Huang et al. 2025).

What gradscope should report:
    one loss spike at step 120 (~1e6x), whose gradients spiked with it in every parameter
        (net.0.weight ... net.4.bias; total grad norm ~2e6x the running median): one bad
        batch, one finding (not a second, exploding-gradients one: they do not recur);
    no NaN/Inf, no dead units, no spike at any other step (the largest other total grad norm
        is ~3x the median); steps 0-119 are a healthy run.
    after step 120 (a consequence, not a second fault): the update:weight ratio of
        net.0.weight (and net.4.weight) collapses ~100x; a report of stalled updates there
        from step ~121 is correct.
    Seed-independent: the poisoned step is always 120.

Ground truth printed by this script: the poisoned step, the loss there vs the median loss, the
total grad norm there vs the median grad norm and the largest grad norm at any other step, the
loss before and after, and that every loss and gradient was finite.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 200
LR = 1e-3
BATCH = 64
IN_FEATURES = 20
POISON_STEP = 120
POISON_SCALE = 1000.0


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model() -> nn.Module:
    return Regressor()


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(seed)
    w1 = torch.randn(IN_FEATURES, 1, generator=data) / IN_FEATURES**0.5
    w2 = torch.randn(IN_FEATURES, 1, generator=data) / IN_FEATURES**0.5

    losses: list[float] = []
    grad_norms: list[float] = []
    finite = True
    for step in range(steps):
        x = torch.randn(BATCH, IN_FEATURES, generator=data)
        y = x @ w1 + torch.sin(2 * x @ w2)
        if step == POISON_STEP:
            x = x * POISON_SCALE  # the poisoned batch: same labels, features in the wrong units
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        finite = (
            finite
            and math.isfinite(loss.item())
            and all(bool(torch.isfinite(g).all()) for g in grads)
        )
        losses.append(loss.item())
        optimizer.step()
        if step % 40 == 0 or step in (POISON_STEP, POISON_STEP + 1, steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4g}  grad norm {grad_norms[-1]:.3g}")

    loss_t, grad_t = torch.tensor(losses), torch.tensor(grad_norms)
    others = torch.cat([grad_t[:POISON_STEP], grad_t[POISON_STEP + 1 :]])
    truth: dict[str, float] = {"poisoned_step": POISON_STEP, "all_finite": int(finite)}
    if steps > POISON_STEP:
        truth.update(
            loss_at_poison=losses[POISON_STEP],
            median_loss=loss_t.median().item(),
            loss_ratio=losses[POISON_STEP] / loss_t.median().item(),
            grad_norm_at_poison=grad_norms[POISON_STEP],
            median_grad_norm=grad_t.median().item(),
            grad_ratio=grad_norms[POISON_STEP] / grad_t.median().item(),
            max_other_grad_ratio=(others.max() / grad_t.median()).item(),
            mean_loss_before=loss_t[POISON_STEP - 20 : POISON_STEP].mean().item(),
            mean_loss_after=loss_t[-20:].mean().item(),
        )
        print(
            f"poisoned step {POISON_STEP}: loss {truth['loss_at_poison']:.3g} vs median "
            f"{truth['median_loss']:.3g} ({truth['loss_ratio']:.2g}x); total grad norm "
            f"{truth['grad_norm_at_poison']:.3g} vs median {truth['median_grad_norm']:.3g} "
            f"({truth['grad_ratio']:.2g}x)"
        )
        print(
            f"largest grad norm at any other step: {truth['max_other_grad_ratio']:.2f}x median; "
            f"mean loss steps {POISON_STEP - 20}-{POISON_STEP - 1}: "
            f"{truth['mean_loss_before']:.3f}, last 20 steps: {truth['mean_loss_after']:.3f}"
        )
    print(f"first loss {losses[0]:.3f}, every loss and gradient finite: {finite}")
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
