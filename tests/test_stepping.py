"""What a step is: optimizer steps, accumulation, loops with no optimizer, closures, GANs, AMP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope

from models import batch, cpu_scaler, mlp, skip_without_cpu_fused, train


def _loss(model, seed):
    x, y = batch(seed=seed)
    return nn.functional.cross_entropy(model(x), y)


def test_gradient_accumulation_records_accumulated_grads_once_per_step(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected, losses = [], []
    with gradscope.watch(model, out=out) as scope:
        for step in range(3):
            opt.zero_grad()
            micro = []
            for k in range(4):
                loss = _loss(model, 10 * step + k) / 4
                loss.backward()
                micro.append(loss.item())
            expected.append(torch.linalg.vector_norm(model[0].weight.grad).item())
            losses.append(sum(micro) / 4)
            opt.step()
    run = scope.load()
    assert run.meta["steps"] == 3 and run.meta["step_mode"] == "optimizer"
    assert run.wide("grad_norm")["0.weight"].tolist() == pytest.approx(expected, rel=1e-5)
    # loss: the mean of the tensors backward() was called on during the step
    assert run.wide("loss")["(run)"].tolist() == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize("style", ["no_grad", "dot_data", "set_to_none"])
def test_hand_written_sgd_without_optimizer_counts_backward_passes(out, style):
    model = mlp()
    params = list(model.parameters())
    expected = []
    with gradscope.watch(model, out=out) as scope:
        for i in range(5):
            _loss(model, i).backward()
            expected.append(torch.linalg.vector_norm(params[0].grad).item())
            if style == "dot_data":  # invisible to version counters
                for p in params:
                    p.data -= 0.1 * p.grad.data
                    p.grad.data.zero_()
            else:
                with torch.no_grad():
                    for p in params:
                        p -= 0.1 * p.grad
                        if style == "set_to_none":
                            p.grad = None
                        else:
                            p.grad.zero_()
    run = scope.load()
    assert run.meta["steps"] == 5 and run.meta["step_mode"] == "backward"
    assert run.wide("grad_norm")["0.weight"].tolist() == pytest.approx(expected, rel=1e-5)
    assert list(run.wide("update_ratio").index) == [0]  # sampled step 0, after the hand update


def test_manual_step(out):
    model = mlp()
    with gradscope.watch(model, out=out) as scope:
        for i in range(4):
            for k in range(2):  # two backward passes per step
                _loss(model, 2 * i + k).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
            scope.step()
    run = scope.load()
    assert run.meta["steps"] == 4 and run.meta["step_mode"] == "manual"
    assert len(run.wide("grad_norm")) == 4


def test_lbfgs_closure_reads_the_first_evaluation(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = batch()
    first_norms, first_losses = [], []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if len(first_norms) < calls[0] + 1:
            first_norms.append(torch.linalg.vector_norm(model[0].weight.grad).item())
            first_losses.append(loss.item())
        return loss

    calls = [0]
    with gradscope.watch(model, out=out) as scope:
        for calls[0] in range(3):
            opt.step(closure)
    run = scope.load()
    assert run.meta["steps"] == 3
    assert run.wide("grad_norm")["0.weight"].tolist() == pytest.approx(first_norms, rel=1e-5)
    assert run.wide("loss")["(run)"].tolist() == pytest.approx(first_losses, rel=1e-5)


def test_gan_two_models_two_optimizers_one_run(out):
    gen, disc = nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    with gradscope.watch({"G": gen, "D": disc}, out=out) as scope:
        for _ in range(4):
            real, z = torch.randn(16, 8), torch.randn(16, 4)
            opt_d.zero_grad()
            fake = gen(z).detach()
            d_loss = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake), torch.zeros(16, 1))
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss = bce(disc(gen(z)), torch.ones(16, 1))
            g_loss.backward()
            opt_g.step()
    run = scope.load()
    norms = run.wide("grad_norm")
    assert {"G.0.weight", "D.0.weight"} <= set(norms.columns)
    # one step = D's step + G's step, the first iteration included (G found at its 1st step)
    assert run.meta["steps"] == 4
    assert norms[["G.0.weight", "D.0.weight"]].notna().all().all()


def test_two_scopes_on_two_models(out):
    a, b = mlp(), mlp()
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    with gradscope.watch(a, out=out, name="a") as sa, gradscope.watch(b, out=out, name="b") as sb:
        for i in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                _loss(model, i).backward()
                opt.step()
    assert sa.steps == 3 and sb.steps == 3
    assert sa.load().wide("grad_norm").shape == (3, 6)


def test_explicit_optimizer_must_step_the_model(out):
    model, other = mlp(), mlp()
    with pytest.raises(ValueError, match="steps none of the watched parameters"):
        gradscope.watch(model, torch.optim.SGD(other.parameters(), lr=0.1), out=out)
    assert not out.exists() or not any(out.iterdir())


def test_amp_grad_scaler_unscaled_grads_and_skipped_steps(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = cpu_scaler(init_scale=1024.0)
    expected, losses = {}, {}
    with gradscope.watch(model, out=out) as scope:
        for i in range(4):
            x, y = batch(seed=i)
            if i == 2:
                x[0, 0] = float("inf")  # this step's scaled grads hold inf/NaN: GradScaler skips
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            losses[i] = loss.item()
            scaler.unscale_(opt)
            expected[i] = torch.linalg.vector_norm(model[0].weight.grad).item()
            scaler.step(opt)
            scaler.update()
    run = scope.load()
    assert run.meta["steps"] == 4
    norms = run.wide("grad_norm")["0.weight"]
    for i in (0, 1, 3):
        assert norms[i] == pytest.approx(expected[i], rel=1e-4)  # unscaled: not x1024
    assert not math.isfinite(norms[2])
    assert run.wide("skipped_step")["(run)"].tolist() == [0, 0, 1, 0]
    assert run.wide("amp_scale")["(run)"].tolist() == [1024, 1024, 1024, 512]
    assert run.wide("grad_nonfinite").loc[2].sum() > 0
    loss = run.wide("loss")["(run)"]
    assert loss[0] == pytest.approx(losses[0], rel=1e-3)  # the unscaled loss
    assert [e["step"] for e in run.events if e["event"] == "skipped_step"] == [2]


def test_fused_optimizer_scaled_grads_divided_by_grad_scale(out):
    skip_without_cpu_fused()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = cpu_scaler(init_scale=1024.0)
    with gradscope.watch(model, out=out) as scope:
        x, y = batch()
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        expected = torch.linalg.vector_norm(model[0].weight.grad).item() / 1024.0
        scaler.step(opt)
        scaler.update()
    run = scope.load()
    assert run.wide("grad_norm").loc[0, "0.weight"] == pytest.approx(expected, rel=1e-5)
    assert run.wide("skipped_step").loc[0, "(run)"] == 0


def test_forced_backward_mode_ignores_the_optimizer(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out, step_on="backward") as scope:
        train(model, opt, 3)
    assert scope.load().meta["step_mode"] == "backward" and scope.steps == 3


def test_unrelated_optimizer_is_ignored(out):
    model, other = mlp(), mlp()
    opt, opt_other = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, other))
    with gradscope.watch(model, out=out) as scope:
        for i in range(2):
            for m, o in ((model, opt), (other, opt_other), (other, opt_other)):
                o.zero_grad()
                _loss(m, i).backward()
                o.step()
    assert scope.steps == 2


def test_backward_of_an_unwatched_model_is_ignored(out):
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    losses = []
    with gradscope.watch(a, oa, out=out) as scope:
        for _ in range(3):
            oa.zero_grad()
            loss = (a(x) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
            oa.step()
            ob.zero_grad()
            (b(x) * 0 + 1000.0).sum().backward()  # another model's loss: not this run's
            ob.step()
    assert scope.load().wide("loss")["(run)"].tolist() == pytest.approx(losses, rel=1e-6)
