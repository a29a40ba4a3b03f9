"""NaN created in the forward pass: a hand-written log(1 - sigmoid) meets a saturated sigmoid.

A binary classifier computes its own Bernoulli log-probabilities, log p and log(1 - p) of a
sigmoid output, instead of using the fused ``F.binary_cross_entropy_with_logits``. In float32
sigmoid(z) rounds to exactly 1.0 once z > ~16.6 (1 - p < 2^-24). On separable data Adam (lr
0.015) keeps growing the logits, and the first time one example's logit crosses that line the
custom module's log(1 - p) = log(0) = -inf: the first non-finite value of the run is created in
the FORWARD pass, by ``log_probs``, from finite inputs (p = 1.0). The hand-written cross
entropy then multiplies it by a zero label weight, (1 - y) * log(1 - p) = 0 * -inf = NaN, the
loss is NaN, backward fills every gradient with NaN, and the update writes NaN into every weight
(docs/findings.md, "Where NaN and Inf come from": log(0) = -inf, 0 * log 0 = NaN; forward
hooks on leaf modules found the first non-finite output at the custom log module). Nothing
guards against it, as in many real runs.

What gradscope should report:
    non-finite (Inf) forward output first at log_probs (LogProbs, custom module) at step 33 for
        seed 0 (seeds 0/1/2: 33/45/46), its input (prob, nn.Sigmoid) finite;
    from that step the loss is NaN and the gradients are NaN (all of body.2.*, most of
        body.0.*); from the next step every parameter and every module output is NaN.
    before it, the cause building up: the sigmoid prob (nn.Sigmoid) saturating, the fraction
        of outputs with |p - 0.5| > 0.49 rising from 0 at step ~10 to ~55% at step 32;
        otherwise the run is finite and healthy until then.

    (gradscope names the module at the first occurrence with trace_nonfinite='always'; with
    the default 'auto' it reports the step and the forward pass, armed too late to trace a
    one-off whose NaN weights leave nothing to trace afterwards.)

Ground truth printed by this script: the step at which the loss first becomes non-finite and,
replaying that step's forward pass from the weights it used, the first module (forward order)
whose output is non-finite, whether that module's input was finite, and what it output.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 80
LR = 0.015
BATCH = 128
IN_FEATURES = 10
HIDDEN = 32


def bernoulli_log_probs(p: torch.Tensor) -> torch.Tensor:
    """[log p, log(1 - p)] for a probability p: the naive way, no clamp, no log1p/logsigmoid."""
    return torch.stack([torch.log(p), torch.log(1 - p)], dim=-1)


class LogProbs(nn.Module):
    """Custom module: Bernoulli log-probabilities of a probability."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_probs(p)


class BinaryClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        self.prob = nn.Sigmoid()
        self.log_probs = LogProbs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(self.prob(self.body(x).squeeze(-1)))


def build_model() -> nn.Module:
    return BinaryClassifier()


def bernoulli_nll(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hand-written binary cross entropy: -(y log p + (1 - y) log(1 - p))."""
    return -(y * log_probs[..., 0] + (1 - y) * log_probs[..., 1]).mean()


def replay(
    state: dict[str, torch.Tensor], x: torch.Tensor
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Ground truth only: (module name, input, output) of every leaf module in forward order,
    replayed functionally from a parameter snapshot (no module hook fires)."""
    trace = []
    h = F.linear(x, state["body.0.weight"], state["body.0.bias"])
    trace.append(("body.0", x, h))
    trace.append(("body.1", h, torch.relu(h)))
    h = trace[-1][2]
    trace.append(("body.2", h, F.linear(h, state["body.2.weight"], state["body.2.bias"])))
    h = trace[-1][2].squeeze(-1)
    trace.append(("prob", h, torch.sigmoid(h)))
    h = trace[-1][2]
    trace.append(("log_probs", h, bernoulli_log_probs(h)))
    return trace


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_FEATURES, generator=data)

    first_bad = -1
    bad_state: dict[str, torch.Tensor] = {}
    bad_x = torch.empty(0)
    for step in range(steps):
        x = torch.randn(BATCH, IN_FEATURES, generator=data)
        y = (x @ teacher > 0).float()  # linearly separable labels
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer.zero_grad()
        loss = bernoulli_nll(model(x), y)
        loss.backward()
        optimizer.step()
        if first_bad < 0 and not math.isfinite(loss.item()):
            first_bad, bad_state, bad_x = step, before, x
        if step % 10 == 0 or step == first_bad:
            print(f"step {step:4d}  loss {loss.item():.4g}")

    truth: dict[str, float] = {"first_nonfinite_loss_step": first_bad}
    if first_bad < 0:
        print("the loss stayed finite")
        return truth
    weights_finite = all(bool(torch.isfinite(v).all()) for v in bad_state.values())
    with torch.no_grad():
        trace = replay(bad_state, bad_x)
    culprit = next((t for t in trace if not bool(torch.isfinite(t[2]).all())), None)
    assert culprit is not None
    name, inp, out = culprit
    truth["weights_finite_at_first_bad_step"] = int(weights_finite)
    truth["culprit_input_finite"] = int(bool(torch.isfinite(inp).all()))
    truth["culprit_neg_inf_outputs"] = int((out == -math.inf).sum())
    truth["culprit_nan_outputs"] = int(out.isnan().sum())
    print(
        f"first non-finite loss at step {first_bad} (weights used at that step all finite: "
        f"{weights_finite})"
    )
    print(
        f"first module with a non-finite output in that step's forward pass: {name} "
        f"(input finite: {bool(truth['culprit_input_finite'])}, max input "
        f"{inp.max().item():.9g}; output has {truth['culprit_neg_inf_outputs']} -inf, "
        f"{truth['culprit_nan_outputs']} NaN)"
    )
    earlier = ", ".join(t[0] for t in trace[: trace.index(culprit)])
    print(f"modules before it, all finite: {earlier}")
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
