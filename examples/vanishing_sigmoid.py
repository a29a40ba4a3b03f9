"""Vanishing gradients in a deep sigmoid MLP with PyTorch's default (Glorot "standard") init.

PyTorch's default ``nn.Linear`` init draws W ~ U[-1/sqrt(n), 1/sqrt(n)], which is exactly the
"standard" initialisation of Glorot & Bengio (2010, eq. 1): n Var[W] = 1/3 (eq. 15). Going back
through a layer multiplies the gradient w.r.t. the pre-activations by W^T diag(sigma'(s)); with
n Var[W] = 1/3 and sigma' <= 1/4 (Pascanu et al. 2013: gamma = 1/4 for the sigmoid) every layer
shrinks the backward signal by roughly sqrt(1/3) * E[sigma'] ~ 0.14. Over the 11 sigmoid layers of
this 12-layer network that is a factor ~1e-9 between the last layer and the first, and unlike
the linear-regime argument of Glorot & Bengio's eq. 14 the *weight* gradients shrink with it: the
first layers practically do not train. Glorot & Bengio: "Sigmoid activations ... should be avoided
when initializing from small random weights".

What gradscope should report:
    vanishing gradient at 0 (nn.Linear, the first layer) from step 0 for the whole run, and
        at the early layers in general (2, 4, ...): 0.weight's gradient norm is ~1e-10 at
        step 0 vs ~0.2 for the output layer 22 (nn.Linear), ratio ~5e-10; the backward signal
        (gradient w.r.t. each module's output) shrinks ~7-9x per Linear+Sigmoid pair from 22
        down to 0 (ratio first/last ~2e-10); 0.weight's SGD update (lr 0.1) is ~2e-12 of the
        weight, below float32 resolution: the first layer does not change at all (update
        ratio 0, vs the CS231n ~1e-3 band). The loss stays at chance (0.69).
    no dead units, no saturation (every sigmoid output is within 0.5 +- 0.49), no NaN/Inf,
        no spike. Seeds 0/1/2 all give a first/last signal ratio of 2-3e-10.

Ground truth printed by this script: weight-gradient norms of the first and last Linear at step 0,
the norm of dL/d(output of Linear i) at step 0 for the first and last Linear and their ratio, and
the relative change ||W_end - W_0|| / ||W_0|| of the first and last layer after training.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 100
DEPTH = 12  # Linear layers; Sigmoid between each pair
WIDTH = 64
IN_FEATURES = 32
LR = 0.1


def build_model() -> nn.Module:
    """12 Linear layers of width 64 with a Sigmoid after each hidden one; default init."""
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        fan_in = IN_FEATURES if i == 0 else WIDTH
        fan_out = 1 if i == DEPTH - 1 else WIDTH
        layers.append(nn.Linear(fan_in, fan_out))
        if i < DEPTH - 1:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic binary task: is the sum of the first four features positive?"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, IN_FEATURES, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    return x, y


def linear_outputs(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor
) -> list[torch.Tensor]:
    """Ground truth only: replay the forward pass functionally from a parameter snapshot.

    Uses F.linear / torch.sigmoid on copies of the weights, so no module hook (a monitor's
    included) fires and no parameter's .grad is touched. Returns each Linear layer's output.
    """
    outs = []
    h = x
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            outs.append(h)
        else:
            h = torch.sigmoid(h)
    return outs


def main(steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = make_data(seed)
    linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    grad0: dict[str, float] = {}
    for step in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        if step == 0:
            grad0 = {n: model.get_parameter(f"{n}.weight").grad.norm().item() for n in linears}
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    # Backward signal at step 0, recomputed from the initial weights.
    state = {k: v.clone().requires_grad_(True) for k, v in initial.items()}
    outs = linear_outputs(model, state, x)
    signal = torch.autograd.grad(F.binary_cross_entropy_with_logits(outs[-1], y), outs)
    sig = [s.norm().item() for s in signal]
    final = model.state_dict()
    change = {
        n: (
            (final[f"{n}.weight"] - initial[f"{n}.weight"]).norm() / initial[f"{n}.weight"].norm()
        ).item()
        for n in (first, last)
    }
    truth = {
        "weight_grad_first": grad0[first],
        "weight_grad_last": grad0[last],
        "weight_grad_ratio": grad0[first] / grad0[last],
        "signal_first": sig[0],
        "signal_last": sig[-1],
        "signal_ratio": sig[0] / sig[-1],
        "rel_change_first": change[first],
        "rel_change_last": change[last],
    }
    print(
        f"step 0 weight-grad norm: {first}.weight {grad0[first]:.3e}, "
        f"{last}.weight {grad0[last]:.3e} (ratio {truth['weight_grad_ratio']:.2e})"
    )
    print(
        "step 0 ||dL/d(output of Linear)||, input -> output: "
        + " ".join(f"{n}:{s:.1e}" for n, s in zip(linears, sig))
    )
    print(f"backward-signal ratio first/last ({first}/{last}): {truth['signal_ratio']:.2e}")
    print(
        f"relative weight change after {steps} steps: {first} {change[first]:.2e}, "
        f"{last} {change[last]:.2e}"
    )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
