"""Activation statistics and the backward signal, against layers built to known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope

from models import CNN, batch, half_dead_linear, mlp, train


def _step(model, opt, x, y, loss_fn=nn.functional.cross_entropy):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_exactly_half_dead(out):
    model = half_dead_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out) as scope:
        _step(model, opt, torch.rand(16, 4), torch.randint(0, 2, (16,)))
    assert scope.load().wide("act_dead_fraction").loc[0, "1"] == 0.5


def test_dead_per_channel_for_conv_maps(out):
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[2:].zero_()
        conv.bias[2:] = -1.0  # channels 2 and 3 output 0 everywhere after the ReLU
        conv.weight[:2].fill_(0.1)
        conv.bias[:2] = 1.0
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out) as scope:
        _step(model, opt, torch.rand(8, 1, 6, 6), torch.randint(0, 2, (8,)))
    assert scope.load().wide("act_dead_fraction").loc[0, "1"] == 0.5


def test_unit_dead_only_if_dead_for_every_example(out):
    # one example activates unit 0: it is alive, although 15 of 16 examples leave it at 0
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight[:] = torch.tensor([[1.0], [-1.0]])
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.ReLU())
    x = -torch.ones(16, 1)
    x[3] = 1.0  # unit 0 alive once, unit 1 alive for the other 15
    with gradscope.watch(model, out=out) as scope:
        model(x).sum().backward()
    assert scope.load().wide("act_dead_fraction").loc[0, "1"] == 0.0


def test_mean_std_saturation_and_output_grads_match_torch(out):
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Sigmoid(), nn.Linear(16, 4)
    )
    with torch.no_grad():
        model[0].weight.mul_(8)  # push tanh into saturation
    seen = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = output

        return hook

    for i in (0, 1, 3):
        model[i].register_forward_hook(keep(str(i)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = batch()
    with gradscope.watch(model, out=out) as scope:
        _step(model, opt, x, y)
    run = scope.load()
    t, s = seen["1"].detach(), seen["3"].detach()
    assert run.wide("act_mean").loc[0, "1"] == pytest.approx(t.mean().item(), abs=1e-6)
    assert run.wide("act_std").loc[0, "1"] == pytest.approx(t.std().item(), rel=1e-4)
    assert run.wide("act_mean").loc[0, "3"] == pytest.approx(s.mean().item(), rel=1e-5)
    assert run.wide("act_std").loc[0, "3"] == pytest.approx(s.std().item(), rel=1e-4)
    sat_t = (t.abs() > 0.99).float().mean().item()
    assert 0.1 < sat_t < 0.9
    assert run.wide("act_saturation").loc[0, "1"] == pytest.approx(sat_t)
    sat_s = ((s - 0.5).abs() > 0.49).float().mean().item()
    assert run.wide("act_saturation").loc[0, "3"] == pytest.approx(sat_s)
    signal = run.wide("output_grad_norm")
    for name in ("0", "1", "3"):
        expected = torch.linalg.vector_norm(seen[name].grad).item()
        assert signal.loc[0, name] == pytest.approx(expected, rel=1e-5)
    assert run.wide("act_nonfinite").loc[0].tolist() == [0.0, 0.0]


def test_softmax_saturation_counts_distributions(out):
    model = nn.Sequential(nn.Linear(8, 5), nn.Softmax(dim=-1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias[:] = torch.tensor([10.0, 0, 0, 0, 0])  # max prob 0.9998: saturated
    with gradscope.watch(model, out=out) as scope:
        model(torch.randn(6, 8))[:, 1].sum().backward()
    assert scope.load().wide("act_saturation").loc[0, "1"] == 1.0


def test_thresholds_are_config(out):
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(4, 8)
    with gradscope.watch(model, out=out, tanh_saturation=0.0) as scope:
        model(x).sum().backward()
    assert scope.load().wide("act_saturation").loc[0, "1"] == 1.0


def test_nonfinite_activations_counted(out):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with gradscope.watch(model, out=out) as scope:
        y = model[1](model[0](torch.randn(8, 4))).clone()
        y[0, 0] = float("nan")
        y[1, 1] = float("inf")
        relu_out = model[1](y)  # NaN and inf pass through the ReLU
        model[2](relu_out).sum().backward()
    counts = scope.load().wide("act_nonfinite")
    assert counts.loc[0, "1"] == 2  # pooled over both calls of the ReLU (same width)


def test_user_named_activation_types(out):
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Linear(4, 4), Swish(), nn.Linear(4, 2))
    with gradscope.watch(model, out=out, activation_types=["Swish"]) as scope:
        model(torch.randn(8, 4)).sum().backward()
    assert "1" in scope.load().wide("act_dead_fraction").columns


def test_shared_activation_module_gets_one_site_per_width(out):
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, out=out) as scope:
        _step(model, opt, torch.randn(4, 1, 16, 16), torch.randint(0, 4, (4,)))
    run = scope.load()
    assert {"act", "act#1"} <= set(run.wide("act_dead_fraction").columns)
    assert run.meta["sites"][:3] == ["conv1", "act", "conv2"]


def test_module_called_per_time_step_pools_its_calls(out):
    cell = nn.RNNCell(4, 6)
    act = nn.ReLU()
    head = nn.Linear(6, 2)
    model = nn.ModuleDict({"cell": cell, "act": act, "head": head})
    with gradscope.watch(model, out=out) as scope:
        h = torch.zeros(3, 6)
        outs = []
        for _ in range(20):
            h = cell(torch.randn(3, 4), h)
            outs.append(act(h))
        head(torch.stack(outs).mean(0)).sum().backward()
        expected = (torch.stack([o.detach() for o in outs]).amax(dim=(0, 1)) <= 0).float().mean()
    run = scope.load()
    assert list(run.wide("act_dead_fraction").columns) == ["act"]
    assert run.wide("act_dead_fraction").loc[0, "act"] == pytest.approx(expected.item())


def test_eval_forwards_and_checkpoint_recompute_are_not_counted(out):
    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    head = nn.Linear(8, 4)
    model = nn.ModuleDict({"block": block, "head": head})
    x = torch.randn(16, 8)
    with gradscope.watch(model, out=out) as scope:
        with torch.no_grad():
            block(x * 100)  # evaluation: must not enter the statistics
        h = checkpoint(block, x, use_reentrant=False)
        head(h).sum().backward()
        expected_mean = block(x).mean().item()
    run = scope.load()
    assert run.wide("act_mean").loc[0, "block.1"] == pytest.approx(expected_mean, rel=1e-5)


def test_inplace_relu_works_and_signal_is_the_pre_activation_gradient(out):
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(inplace=True), nn.Linear(8, 4))
    x, y = batch()
    ref = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ref.load_state_dict(model.state_dict())
    pre = ref[0](x)
    pre.retain_grad()
    nn.functional.cross_entropy(ref[2](ref[1](pre)), y).backward()
    with gradscope.watch(model, out=out) as scope:
        nn.functional.cross_entropy(model(x), y).backward()
    signal = scope.load().wide("output_grad_norm")
    assert signal.loc[0, "0"] == pytest.approx(torch.linalg.vector_norm(pre.grad).item(), rel=1e-5)


def test_sampling_every_k_steps(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out, activation_every=4) as scope:
        train(model, opt, 10)
    run = scope.load()
    assert list(run.wide("act_dead_fraction").index) == [0, 4, 8]
    assert list(run.wide("output_grad_norm").index) == [0, 4, 8]
    assert list(run.wide("grad_norm").index) == list(range(10))


def test_layers_in_forward_order_not_definition_order(out):
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(6, 2)
            self.early = nn.Linear(8, 6)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    model = Reversed()
    with gradscope.watch(model, out=out) as scope:
        model(torch.randn(2, 8)).sum().backward()
    run = scope.load()
    # torch.relu is measured as a functional site, right after the layer it follows
    names = [e["name"] for e in run.meta["layers"] if e["kind"] == "module"]
    assert names == ["early", "early:relu", "late"]
    assert list(run.wide("grad_norm").columns) == [
        "early.weight",
        "early.bias",
        "late.weight",
        "late.bias",
    ]


def test_fractions_of_a_step_with_nan_outputs_are_nan_not_zero(out):
    """A NaN output is neither dead nor saturated: on the step whose batch holds a NaN the
    fractions are NaN (the count says why), and the clean steps keep their exact values."""
    model = nn.Sequential(half_dead_linear(), nn.Tanh())
    # no optimizer: each backward pass is a step, and the weights stay as built
    with gradscope.watch(
        model, out=out, activation_every=1, quiet=True, step_on="backward", trace_nonfinite="off"
    ) as scope:
        for i in range(3):
            x = torch.rand(16, 4)
            if i == 1:
                x[3, 0] = float("nan")
            model.zero_grad()
            model(x).sum().backward()
    run = scope.load()
    dead = run.wide("act_dead_fraction")["0.1"]
    assert dead[0] == 0.5 and dead[2] == 0.5 and dead.isna()[1]
    sat = run.wide("act_saturation")["1"]
    assert sat.notna()[0] and sat.isna()[1]
    assert run.wide("act_nonfinite")["0.1"][1] > 0
    assert run.meta["host"]  # with the pid: a reader can tell a dead run from a live one


def test_a_loop_without_optimizer_records_activations_at_every_sampled_step(out):
    """Without an optimizer a step is closed by the next backward pass, after the next
    forward already ran: that forward's statistics belong to the next row, not to nobody."""
    model = nn.Sequential(half_dead_linear(), nn.Tanh())
    with gradscope.watch(
        model, out=out, activation_every=2, quiet=True, step_on="backward"
    ) as scope:
        for _ in range(7):
            model.zero_grad()
            model(torch.rand(16, 4)).sum().backward()
    run = scope.load()
    assert list(run.wide("act_dead_fraction").index) == [0, 2, 4, 6]
    assert (run.wide("act_dead_fraction")["0.1"] == 0.5).all()
    assert list(run.wide("output_grad_norm").index) == [0, 2, 4, 6]
