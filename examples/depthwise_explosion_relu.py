"""Backward signal exploding with depth: a 20-layer ReLU MLP initialised at 1.5x He scale.

He et al. (2015) chose Var[W] = 2/n so that a ReLU layer keeps the variance of the forward
activations and of the back-propagated gradients constant. Scale every weight by g and, because
a zero-bias ReLU network is positively homogeneous, each layer multiplies the gradient w.r.t. the
layer outputs by g on its way back: over 18 hidden-to-hidden layers g = 1.5 gives
1.5^18 ~ 1.5e3 between the last hidden layer and the first, and 1.5^19 ~ 2.2e3 between the
output layer and the first (the project's measurement: ||dL/dh1|| / ||dL/dh20|| = 1.9e3-2.9e3
for g = 1.5, docs/findings.md, `exploding_gradients`). The *weight*-gradient norms hardly show
it: the first/last weight-gradient ratio stays of the same order as for g = 1 (Glorot & Bengio
2010, eq. 14: Var[dC/dw] is the same for all layers; exactly unchanged for a loss linear in the
output, here only the softmax's saturation differs), so a tool needs the gradients w.r.t. module
outputs (backward hooks) to see it. Training uses Adam
with a small lr (1e-4, 50 steps) so the run stays finite.

Network: 32 -> 19 x (Linear(., 64), ReLU) -> Linear(64, 10), weights 1.5 x He-normal, zero
biases, a fixed synthetic 10-class task. Linear layers are 0, 2, ..., 36 (hidden) and 38 (output).

What gradscope should report:
    exploding backward signal (gradient w.r.t. module outputs) from step 0, growing from the
        output toward the input: largest at 0 (nn.Linear, the first layer) and 1 (nn.ReLU),
        ~1e3x the value at 36 (nn.Linear, the last hidden layer); the forward activations grow
        the same way (~1.5x per layer, ~2e3x at the last hidden layer).
    the weight-gradient norms themselves are NOT depth-graded (first/output ratio 0.18 here vs
        0.27 for the same net at g = 1).
    weight-gradient and loss magnitudes are large in absolute terms (loss ~5e3, total grad norm
        ~1e4: the logits are ~1e3 because the forward activations grow too).
    no NaN/Inf, no spike. The deepest ReLUs have 20-33% of units dead on a batch (e.g. 35:
        33% at step 0); that is normal for a deep zero-bias ReLU net at init and the same at
        g = 1 (scaling does not change any sign), so it is not this script's pathology.

Ground truth printed by this script: at step 0, ||dL/d(output of Linear 0)|| / ||dL/d(output
of Linear 36)|| and the per-Linear profile, the same ratio for the identical network rescaled to
g = 1 (plain He), the first/output-layer signal ratio, and the first/output weight-gradient ratio
for g = 1.5 and for g = 1.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 50
LR = 1e-4
GAIN = 1.5
DEPTH = 20  # Linear layers: 19 hidden (+ ReLU) and the output layer
WIDTH = 64
IN_FEATURES = 32
CLASSES = 10
N_EXAMPLES = 256


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(DEPTH - 1):
        layers += [nn.Linear(IN_FEATURES if i == 0 else WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.weight.mul_(GAIN)
                nn.init.zeros_(layer.bias)
    return model


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def signal_profile(
    model: nn.Sequential, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, float], dict[str, float]]:
    """Ground truth only: replay forward and backward functionally from a parameter snapshot
    (no module hook fires, no .grad is touched). Returns, per Linear, the norm of the gradient
    w.r.t. its output and the norm of its weight gradient."""
    w = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    outs: dict[str, torch.Tensor] = {}
    h = x
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            h = F.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])
            outs[name] = h
        else:
            h = torch.relu(h)
    loss = F.cross_entropy(h, y)
    names = list(outs)
    grads = torch.autograd.grad(loss, [outs[n] for n in names] + [w[f"{n}.weight"] for n in names])
    signal = {n: g.norm().item() for n, g in zip(names, grads[: len(names)])}
    weight = {n: g.norm().item() for n, g in zip(names, grads[len(names) :])}
    return signal, weight


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
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4g}")

    linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    first, last_hidden, output = linears[0], linears[-2], linears[-1]
    sig, wgrad = signal_profile(model, initial, x, y)
    plain = {k: v / GAIN if k.endswith("weight") else v for k, v in initial.items()}
    sig1, wgrad1 = signal_profile(model, plain, x, y)
    truth = {
        "signal_ratio": sig[first] / sig[last_hidden],
        "signal_ratio_g1": sig1[first] / sig1[last_hidden],
        "signal_first_over_output": sig[first] / sig[output],
        "weight_grad_ratio": wgrad[first] / wgrad[output],
        "weight_grad_ratio_g1": wgrad1[first] / wgrad1[output],
        "gain_power": GAIN ** (len(linears) - 2),
    }
    print(
        "step 0 ||dL/d(output of Linear)||, input -> output: "
        + " ".join(f"{n}:{sig[n]:.1e}" for n in linears)
    )
    print(
        f"backward-signal ratio {first}/{last_hidden} at step 0: {truth['signal_ratio']:.3g} "
        f"(g = {GAIN}; {GAIN}^{len(linears) - 2} = {truth['gain_power']:.3g}); same network "
        f"at g = 1 (He): {truth['signal_ratio_g1']:.3g}"
    )
    print(
        f"backward-signal ratio {first}/{output} (first/output layer) at step 0: "
        f"{truth['signal_first_over_output']:.3g}"
    )
    print(
        f"weight-grad ratio {first}/{output} at step 0: {truth['weight_grad_ratio']:.3g} at "
        f"g = {GAIN}, {truth['weight_grad_ratio_g1']:.3g} at g = 1 (same order: Glorot eq. 14)"
    )
    return truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    main(args.steps, args.seed)
