"""Remedies: each checked against an oracle (torch's own clipping, the published formulas, a
plain-Python reference of each rule) and read back from the run directory."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.remedies.clipping import AutoClip, ZClip
from gradscope.remedies.spec import SpecError, parse_clip, parse_guard, parse_swap

from models import compile_keeps_optimizer_hooks, cpu_scaler, skip_without_cpu_fused


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def _data(seed: int = 0, scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 12, generator=g) * scale, torch.randint(0, 3, (64,), generator=g)


def _events(scope: gradscope.Scope) -> list[dict]:
    text = (scope.run_dir / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _train(model, opt, x, y, steps, before_step=None):
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if before_step is not None:
            before_step(step)
        opt.step()


# -- fixed clipping --------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True])
def test_norm_clip_gives_clip_grad_norm_weights_bit_for_bit(out, per_layer):
    model, ref = _mlp(), _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)

    def oracle(step):
        if per_layer:
            for p in ref.parameters():
                torch.nn.utils.clip_grad_norm_([p], 0.3)
        else:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)

    spec = "norm:0.3,per_layer" if per_layer else "norm:0.3"
    with gradscope.watch(model, opt, out=out, clip=spec, quiet=True) as scope:
        _train(model, opt, x, y, 25)
    _train(ref, ref_opt, x, y, 25, oracle)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    run = scope.load()
    pre = run.wide("grad_norm")
    post = run.wide("grad_norm_clipped")
    total_pre = run.wide("grad_norm_total")["(run)"]
    total_post = run.wide("grad_norm_total_clipped")["(run)"]
    coef = run.wide("clip_coef", kind="run")["(run)"] if not per_layer else None
    if per_layer:
        expected = np.minimum(pre.to_numpy(), 0.3 * pre.to_numpy() / (pre.to_numpy() + 1e-6))
        np.testing.assert_allclose(post.to_numpy(), expected, rtol=1e-5)
        assert (post.to_numpy() <= 0.3 + 1e-6).all()
    else:
        np.testing.assert_allclose(total_post, np.minimum(total_pre, 0.3), rtol=1e-5)
        np.testing.assert_allclose(coef, total_post / total_pre, rtol=1e-5)
        np.testing.assert_allclose(run.wide("clip_threshold")["(run)"], 0.3)
    assert (total_pre > 0.3).any(), "the test must actually clip"
    clipped = [e for e in _events(scope) if e.get("action") == "clipped"]
    assert (
        clipped and clipped[0]["clipped_steps"] == int((total_pre > 0.3 + 1e-6).sum())
    ) or per_layer


# -- AGC ---------------------------------------------------------------------------------------


def _agc_reference(params, lam=0.01, eps=1e-3):
    """Brock et al. 2021, eq. (3), written out: per output unit (row/filter; whole tensor for
    vectors), G_i <- lam * max(|W_i|, eps) / |G_i| * G_i when |G_i| / max(|W_i|, eps) > lam."""
    out = []
    for p in params:
        g = p.grad.detach().clone()
        if g.dim() <= 1:
            w_n = p.detach().norm().clamp(min=eps)
            g_n = g.norm()
            if g_n >= lam * w_n:
                g = g * (lam * w_n / g_n.clamp(min=1e-6))
        else:
            for i in range(g.shape[0]):
                w_n = p.detach()[i].norm().clamp(min=eps)
                g_n = g[i].norm()
                if g_n >= lam * w_n:
                    g[i] = g[i] * (lam * w_n / g_n.clamp(min=1e-6))
        out.append(g)
    return out


@pytest.mark.parametrize("skip_last", [True, False])
def test_agc_matches_the_formula_and_leaves_the_head_out(out, skip_last):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the grads are what we compare
    seen = {}

    def capture(o, args, kwargs):  # registered after gradscope's: sees the clipped grads
        seen["grads"] = [p.grad.detach().clone() for p in model.parameters()]

    with gradscope.watch(
        model, opt, out=out, quiet=True, clip=f"agc:0.01,skip_last={str(skip_last).lower()}"
    ) as scope:
        handle = opt.register_step_pre_hook(capture)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected = _agc_reference(list(model.parameters()))
        raw = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        handle.remove()
    names = [n for n, _ in model.named_parameters()]
    for name, got, want, before in zip(names, seen["grads"], expected, raw):
        if skip_last and name.startswith("4."):
            assert torch.equal(got, before), f"{name}: the final layer must be left alone"
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(seen["grads"][:2], raw[:2])), (
        "the test must actually clip"
    )
    run = scope.load()
    post = run.wide("grad_norm_clipped").iloc[0]
    for name, g in zip(names, seen["grads"]):
        assert post[name] == pytest.approx(g.norm().item(), rel=1e-4)


# -- AutoClip and ZClip against their rules on fixed sequences ---------------------------------


def _run_rule(clipper, norms):
    out = []
    for n in norms:
        t = torch.tensor([n], dtype=torch.float32)
        out.append(clipper.threshold(t, None).item())
    return out


def test_autoclip_is_the_percentile_of_the_finite_history():
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0, 1, 300))
    norms[40] = float("nan")
    norms[41] = float("inf")
    norms[200] = 1e6  # a spike enters the history, as in the paper
    for p, window in ((10, 0), (25, 0), (10, 50), (90, 7)):
        spec = parse_clip(f"autoclip:p={p},history={window}")
        got = _run_rule(AutoClip(spec, 1), norms)
        hist: list[float] = []
        for n, thr in zip(norms, got):
            if math.isfinite(n):
                hist.append(n)
            kept = hist[-window:] if window else hist
            assert thr == pytest.approx(np.percentile(kept, p), rel=1e-5), (p, window, n)


def _zclip_reference(norms, z=2.5, alpha=0.97, warmup=25, factor=1.0):
    """The zclip package's zscore / adaptive_scaling rule in plain Python (its step(): warm-up
    buffer, then EMA of the clipped value), with non-finite norms left out."""
    buf: list[float] = []
    mean = var = None
    out = []
    for g in norms:
        if not math.isfinite(g):
            out.append(math.inf)
            continue
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((b - mean) ** 2 for b in buf) / len(buf)
            out.append(math.inf)
            continue
        std = var**0.5
        zs = (g - mean) / (std + 1e-6)
        clip = None
        if zs > z:
            clip = (mean + z * std / (zs / z)) * factor
        out.append(clip if clip is not None else math.inf)
        v = clip if clip is not None else g
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
    return out


@pytest.mark.parametrize("params", ["", ",z=2,alpha=0.9,warmup=10,factor=0.8"])
def test_zclip_follows_the_reference_rule(params):
    rng = np.random.default_rng(1)
    norms = list(rng.normal(10, 1, 200))
    for s in (60, 61, 130):
        norms[s] = 80.0  # spikes
    norms[100] = float("nan")
    spec = parse_clip("zclip" + (":" + params.lstrip(",") if params else ""))
    kw = {k: spec[k] for k in ("z", "alpha", "warmup", "factor")}
    want = _zclip_reference(norms, **kw)
    got = _run_rule(ZClip(spec, 1), norms)
    for i, (a, b) in enumerate(zip(got, want)):
        if math.isinf(b):
            assert math.isinf(a), i
        else:
            assert a == pytest.approx(b, rel=1e-4), i
    assert sum(math.isfinite(t) for t in got) >= 3  # the spikes were clipped


@pytest.mark.parametrize(
    "clip", ["autoclip", "zclip:warmup=5", "autoclip:per_layer", "zclip:warmup=5,per_layer"]
)
def test_a_nonfinite_step_does_not_poison_the_history(out, clip):
    """Two runs over the same finite batches, one with an extra NaN step in the middle: after
    it, every threshold is the same (and finite) in both."""
    x, y = _data(scale=3.0)

    def run(with_nan):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # same grads every step
        with gradscope.watch(
            model, opt, out=out, clip=clip, quiet=True, trace_nonfinite="off"
        ) as scope:
            for step in range(30):
                opt.zero_grad()
                xb = x * float("nan") if (with_nan and step == 12) else x
                nn.functional.cross_entropy(model(xb), y).backward()
                opt.step()
        run_ = scope.load()
        thr = run_.wide("clip_threshold")
        return thr.drop(index=12) if with_nan else thr.drop(index=29)

    clean, dirty = run(False), run(True)
    assert not np.isnan(dirty.to_numpy()).any()
    assert np.isfinite(dirty.to_numpy()[-5:]).all()
    np.testing.assert_allclose(dirty.to_numpy()[-5:], clean.to_numpy()[-5:], rtol=1e-6)


# -- the guard ------------------------------------------------------------------------------------


def test_guard_leaves_weights_and_optimizer_state_bit_identical_on_a_nan_step(out):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with gradscope.watch(model, opt, out=out, guard=True, quiet=True) as scope:
        for step in range(8):
            opt.zero_grad()
            xb = x.clone()
            if step == 5:
                xb[3, 0] = float("nan")
            nn.functional.cross_entropy(model(xb), y).backward()
            weights = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(opt.state_dict())
            grads = [p.grad for p in model.parameters()]
            opt.step()
            if step == 5:
                for k, v in model.state_dict().items():
                    assert torch.equal(weights[k], v), k
                after = opt.state_dict()["state"]
                for i, st in state["state"].items():
                    for key, v in st.items():
                        assert torch.equal(after[i][key], v), (i, key)
                # the gradients are given back after the skipped step
                assert all(a is b for a, b in zip(grads, (p.grad for p in model.parameters())))
            else:
                assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run = scope.load()
    assert run.wide("guard_skipped").index.tolist() == [5]
    assert run.wide("skipped_step").loc[5, "(run)"] == 1.0
    assert 5 not in run.wide("update_ratio").index  # no update was made
    skips = [e for e in _events(scope) if e.get("remedy") == "guard"]
    assert [(e["action"], e["step"]) for e in skips] == [("skip_step", 5)]
    # the guard's skip is not mistaken for a GradScaler's: the NaN is still a finding
    assert [f["kind"] for f in scope.findings] == ["nonfinite"]


def test_remedies_act_on_a_closure_step(out):
    """``opt.step(closure)`` (Lightning's automatic optimization, LBFGS): the gradients exist
    only after the closure's backward pass; clipping and the guard act there, before the
    update."""
    model, ref = _mlp(), _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)

    def closure_of(net, optimizer, step, clip):
        def closure():
            optimizer.zero_grad()
            xb = x.clone()
            if step == 4:
                xb[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(net(xb), y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.3)
            return loss

        return closure

    with gradscope.watch(model, opt, out=out, clip="norm:0.3", guard=True, quiet=True) as scope:
        for step in range(8):
            opt.step(closure_of(model, opt, step, clip=False))
    for step in range(8):
        if step == 4:  # the guard's skip: no update
            continue
        ref_opt.step(closure_of(ref, ref_opt, step, clip=True))
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    run = scope.load()
    assert run.wide("guard_skipped").index.tolist() == [4]
    post = run.wide("grad_norm_total_clipped")["(run)"]
    assert (post <= 0.3 + 1e-6).all() and len(post) == 7


def test_guard_stops_after_max_skips_in_a_row_and_keeps_the_run(out):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, out=out, guard=3, quiet=True)
    with (
        pytest.raises(gradscope.NonfiniteStepsError, match=r"4 optimizer steps in a row.*3"),
        scope,
    ):
        for step in range(20):
            opt.zero_grad()
            xb = x * float("nan") if step >= 6 else x
            nn.functional.cross_entropy(model(xb), y).backward()
            opt.step()
    assert scope.closed
    meta = json.loads((scope.run_dir / "run.json").read_text())
    assert meta["status"] == "failed"
    findings = json.loads((scope.run_dir / "findings.json").read_text())
    assert [f["kind"] for f in findings] == ["nonfinite"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    actions = [e["action"] for e in _events(scope) if e.get("remedy") == "guard"]
    assert actions == ["skip_step"] * 3 + ["abort"]


def test_guard_only_records_under_a_grad_scaler(out):
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    try:
        scaler = scaler_cls("cpu", init_scale=2.0**4)
    except (RuntimeError, TypeError):
        pytest.skip("no CPU GradScaler in this torch")
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, guard=True, quiet=True) as scope:
        for step in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert not [e for e in _events(scope) if e.get("remedy") == "guard"]
    run = scope.load()
    assert run.wide("skipped_step")["(run)"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert "guard_skipped" not in set(run.metrics["metric"])


# -- swap ---------------------------------------------------------------------------------------


def test_swap_activations_keeps_positive_outputs_and_revives_dead_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # exactly half the units dead on any input below
    x = torch.rand(32, 8)
    model(x).sum().backward()
    g = model[0].weight.grad
    assert (g[:8] == 0).all() and (g[8:] != 0).any()
    h_before = model[1](model[0](x).clone())
    names = gradscope.swap_activations(model, nn.ReLU, lambda: nn.LeakyReLU(0.01))
    assert names == ["1"]
    assert isinstance(model[1], nn.LeakyReLU)
    # the option's own factory keeps inplace=True of the module it replaces
    assert parse_swap("relu->leaky_relu:0.2")[0].make(nn.ReLU(inplace=True)).inplace is True
    pre = model[0](x)
    h_after = model[1](pre.clone())
    pos = pre > 0
    assert torch.equal(h_after[pos], h_before[pos])  # same outputs for positive inputs
    model.zero_grad()
    model(x).sum().backward()
    assert (model[0].weight.grad[:8] != 0).all(dim=1).all()  # the dead rows get gradient


def test_swap_activations_swaps_a_shared_instance_everywhere_and_warns_when_functional():
    act = nn.ReLU()

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act1 = act
            self.act2 = act

        def forward(self, x):
            return self.act2(self.b(self.act1(self.a(x))))

    m = Shared()
    gradscope.swap_activations(m, nn.ReLU, nn.GELU)
    assert isinstance(m.act1, nn.GELU) and m.act1 is m.act2

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    with pytest.warns(UserWarning, match="functionally"):
        assert gradscope.swap_activations(Functional(), nn.ReLU, nn.GELU) == []
    with pytest.raises(TypeError, match=r"not an nn\.Module class"):
        gradscope.swap_activations(m, "relu", nn.GELU)


def _dying_net():
    """48 of layer 2's 64 units dead from the start (bias -2), so the finding comes at once;
    they can come back (measured: 75% -> under 10% within 60 Adam steps once treated)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        m[2].bias[:48] = -2.0
    return m


def test_watch_swaps_on_a_dead_units_finding_and_keeps_measuring(out):
    model = _dying_net()
    old = model[3]
    x = torch.randn(128, 10)
    y = torch.randint(0, 4, (128,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradscope.watch(
        model, opt, out=out, swap="relu->leaky_relu:0.1", quiet=True, activation_every=2
    ) as scope:
        _train(model, opt, x, y, 60)
        assert isinstance(model[3], nn.LeakyReLU) and model[3].negative_slope == 0.1
        assert isinstance(model[1], nn.ReLU)  # the healthy one is left alone
        assert not old._forward_hooks and model[3]._forward_hooks  # hooks moved
        # the NaN tracer follows the swap too
        traced = [m for _, m in scope.parts.tracer.traced_modules()]
        assert any(m is model[3] for m in traced) and not any(m is old for m in traced)
    assert not model[3]._forward_hooks  # and removed at close
    swaps = [e for e in _events(scope) if e.get("remedy") == "swap"]
    assert len(swaps) == 1 and swaps[0]["layer"] == "3" and swaps[0]["from"] == "ReLU"
    step = swaps[0]["step"]
    dead = scope.load().wide("act_dead_fraction")["3"]
    assert dead.index.max() > step + 10  # still measured, under the same layer name
    assert dead.loc[: step - 1].min() >= 0.7 and dead.iloc[-1] < 0.1
    finding = next(f for f in scope.findings if f["kind"] == "dead_units")
    assert finding["remedies"][0]["action"] == "swapped"
    meta = json.loads((scope.run_dir / "run.json").read_text())
    assert any(e["name"] == "3" and e["type"] == "LeakyReLU" for e in meta["layers"])


def test_swap_that_cannot_apply_says_why_in_the_finding(out):
    class Block(nn.Module):  # an activation type we were told about, calling F.relu inside
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 64)

        def forward(self, x):
            return torch.relu(self.fc(x) - 50.0)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(64, 2))
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="functionally"):
        scope = gradscope.watch(
            model,
            opt,
            out=out,
            swap="relu->gelu",
            quiet=True,
            activation_types=["Block"],
            activation_every=1,
        )
    with scope:
        _train(model, opt, x, y, 12)
    finding = next(f for f in scope.findings if f["kind"] == "dead_units")
    note = finding["remedies"][0]
    assert note["action"] == "not_applied" and "functionally" in note["reason"]


@pytest.mark.skipif(
    not compile_keeps_optimizer_hooks(),
    reason="torch 2.2's torch.compile strips optimizer step hooks (torch >= 2.3)",
)
def test_swap_on_a_compiled_model_recompiles_and_uses_the_new_module(out):
    model = _dying_net()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(128, 10)
    y = torch.randint(0, 4, (128,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradscope.watch(
        compiled, opt, out=out, swap="relu->leaky_relu:0.1", quiet=True, activation_every=2
    ):
        _train(compiled, opt, x, y, 30)
    assert isinstance(model[3], nn.LeakyReLU)
    with torch.no_grad():
        eager = model(x)
        assert torch.allclose(compiled(x), eager)  # the compiled graph uses LeakyReLU now


# -- recycle ------------------------------------------------------------------------------------


def test_recycling_leaves_the_output_unchanged_and_resets_the_dead_units():
    model = _dying_net()
    x = torch.randn(128, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.zeros(128, dtype=torch.long)).backward()
    opt.step()  # Adam state exists for every weight
    with torch.no_grad():
        h = model[1](model[0](x))
        dead = ((model[2](h)) <= 0).all(dim=0).nonzero().reshape(-1)
        before = model(x)
    assert dead.tolist() == list(range(48))
    from gradscope.remedies.recycle import make_plan, recycle

    plan = make_plan(model[2], model[4], [], 64)
    assert not isinstance(plan, str)
    w_in = model[2].weight.detach().clone()
    assert recycle(plan, dead, [opt], torch.Generator().manual_seed(0)) == 48
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the output is exactly unchanged
        alive = (model[2](h) > 0).any(dim=0)
    assert alive[:48].float().mean() > 0.8  # the recycled units fire again
    assert not torch.equal(model[2].weight[:48], w_in[:48])  # incoming weights re-drawn
    assert torch.equal(model[2].weight[48:], w_in[48:])  # the live units untouched
    assert (model[2].bias[:48] == 0).all() and (model[4].weight[:, :48] == 0).all()
    assert (model[4].weight[:, 48:] != 0).all()
    for p, idx in (
        (model[2].weight, (slice(None, 48),)),
        (model[2].bias, (slice(None, 48),)),
        (model[4].weight, (slice(None), slice(None, 48))),
    ):
        st = opt.state[p]
        assert (st["exp_avg"][idx] == 0).all() and (st["exp_avg_sq"][idx] == 0).all()
    assert (opt.state[model[2].weight]["exp_avg_sq"][48:] != 0).any()


def test_watch_recycles_dead_units_on_the_finding(out):
    model = _dying_net()
    x = torch.randn(128, 10)
    y = torch.randint(0, 4, (128,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradscope.watch(
        model, opt, out=out, recycle=True, quiet=True, activation_every=2
    ) as scope:
        _train(model, opt, x, y, 60)
    ev = [e for e in _events(scope) if e.get("remedy") == "recycle"]
    assert ev[0]["action"] == "recycled" and ev[0]["layer"] == "3"
    assert ev[0]["units"] == 48 and ev[0]["of"] == 64
    dead = scope.load().wide("act_dead_fraction")["3"]
    assert dead.iloc[0] == pytest.approx(0.75) and dead.iloc[-1] < 0.1
    finding = next(f for f in scope.findings if f["kind"] == "dead_units")
    assert finding["remedies"][0]["action"] == "recycled"


def test_recycle_refuses_layers_it_cannot_map(out):
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x) - 50.0)  # dead, and nothing reads it but the output

    model = Res()
    x = torch.randn(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(
        model, opt, out=out, recycle=True, quiet=True, activation_every=1
    ) as scope:
        for _ in range(10):
            opt.zero_grad()
            (model(x) - 1).pow(2).mean().backward()
            opt.step()
    ev = [e for e in _events(scope) if e.get("remedy") == "recycle"]
    assert ev and ev[0]["action"] == "not_applied" and "reads this activation" in ev[0]["reason"]


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"clip": "zclp"},
            r"clip='zclp': unknown clipping method 'zclp' \(did you mean 'zclip'\?\)",
        ),
        ({"clip": "norm"}, r"norm needs max="),
        ({"clip": "norm:-1"}, r"max='-1' is not valid; expected a number in \(0, inf\]"),
        ({"clip": "autoclip:p=101"}, r"p='101' is not valid"),
        ({"clip": "agc:0.01,per_layer"}, r"unknown parameter of agc 'per_layer'"),
        ({"clip": 3}, r"clip=3: expected a string"),
        ({"swap": "relu->lrelu"}, r"unknown activation 'lrelu'"),
        ({"swap": "relu"}, r"expected SOURCE->TARGET"),
        ({"swap": "relu->gelu:0.1"}, r"gelu takes no argument"),
        ({"guard": -1}, r"guard=-1: expected True, False"),
        ({"recycle": "maybe"}, r"recycle='maybe': expected True or False"),
        ({"swap": "relu->gelu", "diagnose": False}, r"swap= acts on findings, and diagnose=False"),
    ],
)
def test_bad_remedy_options_fail_in_one_line_before_anything_is_written(out, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        gradscope.watch(_mlp(), out=out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_remedy_options_round_trip_through_the_config():
    spec = parse_clip({"method": "zclip", "z": 3, "max": 5})
    assert str(spec) == "zclip:z=3,alpha=0.97,warmup=25,factor=1,max=5,per_layer=false"
    assert parse_clip(str(spec)) == spec and parse_clip(spec) == spec
    assert parse_clip("autoclip")["p"] == 10.0  # the paper's p, not the package's 0.9
    assert parse_clip("zclip")["max"] is None  # no hidden cap
    assert parse_guard(True) == 10 and parse_guard(False) == 0 and parse_guard("5") == 5
    rules = parse_swap("relu->leaky_relu:0.02; tanh->relu")
    assert [str(r) for r in rules] == ["relu->leaky_relu:0.02", "tanh->relu"]
    cfg = gradscope.Config(clip="agc", swap=rules, guard=2)
    assert cfg.to_json()["clip"] == "agc:clip=0.01,eps=0.001,skip_last=true"
    assert gradscope.Config(**{k: v for k, v in cfg.__dict__.items()}).clip == cfg.clip
    with pytest.raises(SpecError):
        parse_swap("relu->gelu;relu->elu")


def test_remedies_in_backward_mode_warn_that_they_cannot_act(out):
    model = _mlp()
    x, y = _data()
    scope = gradscope.watch(model, out=out, clip="norm:1.0", quiet=True)
    with pytest.warns(RuntimeWarning, match="without an optimizer"), scope:
        for _ in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
    assert any(e.get("action") == "inactive" for e in _events(scope))


def test_remedy_actions_reach_tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, guard=True, clip="zclip", quiet=True) as scope:
        for step in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x * (float("nan") if step == 2 else 1)), y).backward()
            opt.step()
    acc = EventAccumulator(str(scope.run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t for t in acc.Tensors("remedies")]
    # the text is markdown with its special characters escaped (skip\_step shows skip_step)
    decoded = [t.tensor_proto.string_val[0].decode().replace("\\", "") for t in texts]
    assert any("skip_step" in d for d in decoded)
    assert [t.step for t, d in zip(texts, decoded) if "skip_step" in d] == [2]
    assert "clip_coef" in acc.Tags()["scalars"] and "guard_skipped" in acc.Tags()["scalars"]


@pytest.mark.skipif(
    not compile_keeps_optimizer_hooks(),
    reason="torch 2.2's torch.compile strips optimizer step hooks (torch >= 2.3)",
)
def test_clipping_a_compiled_model_matches_clip_grad_norm(out):
    """Clipping runs in the optimizer's pre-step hook, outside the compiled graph."""
    model, ref = _mlp(), _mlp()
    compiled = torch.compile(model, backend="eager")
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    with gradscope.watch(compiled, opt, out=out, clip="norm:0.3", quiet=True) as scope:
        _train(compiled, opt, x, y, 8)
    _train(
        ref, ref_opt, x, y, 8, lambda step: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
    )
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert (scope.load().wide("clip_coef")["(run)"] < 1).any()


@pytest.mark.parametrize("fused", [False, True])
def test_clipping_under_a_grad_scaler_matches_unscale_then_clip(out, fused):
    """Under a GradScaler the clip sees unscaled norms: non-fused optimizers get unscaled
    gradients, fused ones still-scaled gradients and a grad_scale (the coefficient is the
    same either way). Reference: the documented recipe, unscale_ + clip_grad_norm_."""
    if fused:
        skip_without_cpu_fused()
    try:
        model, ref = _mlp(), _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=fused)
        scaler = cpu_scaler(init_scale=2.0**10)
        ref_scaler = cpu_scaler(init_scale=2.0**10)
    except (RuntimeError, TypeError, AttributeError) as exc:
        pytest.skip(f"no CPU GradScaler / fused Adam in this torch: {exc}")
    x, y = _data()
    with gradscope.watch(model, opt, out=out, clip="norm:0.3", quiet=True) as scope:
        for _ in range(10):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
    for _ in range(10):
        ref_opt.zero_grad()
        ref_scaler.scale(nn.functional.cross_entropy(ref(x), y)).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (scope.load().wide("clip_coef")["(run)"] < 1).all()


@pytest.mark.parametrize(
    "clip", ["autoclip", "autoclip:history=7", "zclip:warmup=5", "zclip:warmup=5,per_layer"]
)
def test_a_resumed_run_clips_as_if_it_had_never_stopped(out, clip, tmp_path):
    x, y = _data(scale=3.0)

    def batches(step):
        return x * (1 + 0.05 * (step % 7)), y

    def train(model, opt, scope_kwargs, steps, start=0, state=None):
        with gradscope.watch(model, opt, out=out, quiet=True, clip=clip, **scope_kwargs) as scope:
            if state is not None:
                scope.load_state_dict(state)
            for step in range(start, start + steps):
                opt.zero_grad()
                xb, yb = batches(step)
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            saved = scope.state_dict()
        return scope, saved

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    whole, _ = train(model, opt, {}, 30)

    first = _mlp()
    opt1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    _, state = train(first, opt1, {}, 15)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "gs": state}, path)
    ckpt = torch.load(path, weights_only=False)

    def resumed(with_state):
        m = _mlp(1)
        m.load_state_dict(ckpt["model"])
        o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        o.load_state_dict(ckpt["opt"])
        scope, _ = train(m, o, {}, 15, start=15, state=ckpt["gs"] if with_state else None)
        return m, scope

    m2, scope2 = resumed(True)
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    whole_thr = whole.load().wide("clip_threshold").to_numpy()[15:]
    np.testing.assert_array_equal(scope2.load().wide("clip_threshold").to_numpy(), whole_thr)
    assert any(e.get("action") == "state_restored" for e in _events(scope2))
    m3, _ = resumed(False)  # without the state the clipper starts over, and it shows
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), m3.parameters()))


def test_load_state_dict_refuses_another_clip_option(out):
    model = _mlp()
    with gradscope.watch(model, out=out, quiet=True, clip="zclip") as scope:
        state = scope.state_dict()
    with gradscope.watch(model, out=out, quiet=True, clip="autoclip") as scope:
        with pytest.raises(ValueError, match=r"saved with clip='zclip:z=2\.5"):
            scope.load_state_dict(state)
        with pytest.raises(ValueError, match="expected the dict"):
            scope.load_state_dict({"model": 1})
