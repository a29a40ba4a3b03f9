"""What keeps the per-step cost flat in the number of modules, and the flush cadence: the
per-module hooks are out of the modules on steps that are not sampled (and back, in their
places, on those that are), the functional interception leaves roots that call no activation
function, and the default flush waits for ``FLUSH_MIN_SECS``. Timing-free: what is checked is
which hooks are where, which calls happen and which files exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import flusher as flusher_mod
from gradscope import rundir
from gradscope.hooks import Hook

from conftest import hook_counts
from models import batch, mlp, train


def _ours(module: nn.Module) -> list[str]:
    return [h.purpose for h in module._forward_hooks.values() if isinstance(h, Hook)]


def test_per_module_hooks_only_on_sampled_steps(out):
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, activation_every=5, tensorboard=False) as scope:
        layers = [m for name, m in model.named_modules() if name]
        assert all(_ours(m) for m in layers)  # step 0 is sampled
        for step in range(11):
            train(model, opt, 1)
            sampled = scope.steps % 5 == 0  # the step about to run
            assert all(bool(_ours(m)) == sampled for m in layers), step
            # the root keeps its own (one per model: tells a training forward)
            assert "root-forward" in [
                h.purpose for h in model._forward_pre_hooks.values() if isinstance(h, Hook)
            ]
    run = gradscope.load_run(scope.run_dir)
    acts = run.wide("act_dead_fraction")
    assert sorted(acts.index.tolist()) == [0, 5, 10]  # the sampled steps, and only those
    assert len(run.wide("grad_norm")) == 11
    assert hook_counts(model) == {name: (0, 0, 0, 0) for name, _ in model.named_modules()}


def test_parked_hooks_come_back_in_their_places(out):
    model = mlp(depth=3)
    layer = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[str] = []
    layer.register_forward_hook(lambda *a: seen.append("before"))
    with gradscope.watch(model, opt, out=out, activation_every=3, tensorboard=False) as scope:
        train(model, opt, 1)  # step 1 next: parked
        assert scope._rec.modules.parked
        layer.register_forward_hook(lambda *a: seen.append("after"))
        layer.register_forward_hook(lambda *a: seen.append("first"), prepend=True)
        train(model, opt, 2)  # step 3 next: sampled, ours back between the user's
        order = ["ours" if isinstance(h, Hook) else "user" for h in layer._forward_hooks.values()]
        assert order == ["user", "user", "ours", "user"]
        seen.clear()
        model(batch()[0])
        assert seen == ["first", "before", "after"]
    assert [isinstance(h, Hook) for h in layer._forward_hooks.values()] == [False] * 3


def test_a_backward_of_another_model_is_not_counted_while_parked(out):
    watched, other = mlp(), mlp()
    opt = torch.optim.SGD(watched.parameters(), lr=0.1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with gradscope.watch(watched, opt, out=out, tensorboard=False) as scope:
        for _ in range(5):
            train(watched, opt, 1)
            train(other, other_opt, 1)  # its backward passes are none of this scope's
    assert scope.steps == 5
    run = gradscope.load_run(scope.run_dir)
    assert len(run.wide("grad_norm")) == 5 and run.findings == []


class Parts(nn.Module):
    """A model whose owner calls its submodules directly, never its root's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.dec = nn.Linear(16, 4)


def test_submodules_called_without_the_root_keep_their_hooks(out):
    model = Parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, activation_every=2, tensorboard=False) as scope:
        for _ in range(6):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model.dec(model.enc(x)), y).backward()
            opt.step()
        probe = scope._rec.modules
        assert not probe.parking and not probe.parked
        assert "root" in (probe.stopped_parking or "")
    run = gradscope.load_run(scope.run_dir)
    assert len(run.wide("grad_norm")) == 6
    assert sorted(run.wide("act_dead_fraction").index.tolist()) == [0, 2, 4]


def test_hook_calls_per_unsampled_step_do_not_grow_with_modules(out, monkeypatch):
    calls = {"n": 0}
    real = Hook.__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    per_step = {}
    for depth in (3, 30):
        model = mlp(depth=depth)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradscope.watch(model, opt, out=out, name=f"d{depth}", tensorboard=False):
            train(model, opt, 2)  # past the sampled step 0
            monkeypatch.setattr(Hook, "__call__", counting)
            calls["n"] = 0
            train(model, opt, 3)  # steps 2-4: not sampled
            monkeypatch.setattr(Hook, "__call__", real)
        per_step[depth] = calls["n"]
    assert per_step[3] == per_step[30] > 0


class ModulesOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("cls, quiet", [(ModulesOnly, True), (Functional, False)])
def test_functional_interception_leaves_roots_without_activation_calls(out, cls, quiet):
    model = cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, activation_every=1, tensorboard=False) as scope:
        train(model, opt, 6)
        fp = scope._rec.modules.functional
        assert fp is not None
        assert (id(model) in fp.quiet) is quiet
        assert fp.spans == (2 if quiet else 6)
    run = gradscope.load_run(scope.run_dir)
    site = "net.1" if quiet else "fc1:relu"
    assert len(run.wide("act_dead_fraction")[site].dropna()) == 6


def _chunks(scope: gradscope.Scope) -> int:
    return len(list((scope.run_dir / rundir.METRICS).glob("*.parquet")))


def test_default_flush_waits_for_min_secs(out, monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monkeypatch.setattr(flusher_mod, "FLUSH_MIN_SECS", 1e9)
    with gradscope.watch(model, opt, out=out, name="slow", tensorboard=False) as scope:
        train(model, opt, 90)
        assert _chunks(scope) == 0
        train(model, opt, 160)
        assert _chunks(scope) == 1  # the first flush at step 100; the next waits for 5 s
    assert _chunks(scope) == 2 and len(gradscope.load_run(scope.run_dir).wide("grad_norm")) == 250
    monkeypatch.setattr(flusher_mod, "FLUSH_MIN_SECS", 0.0)
    with gradscope.watch(model, opt, out=out, name="due", tensorboard=False) as scope:
        train(model, opt, 250)
        assert _chunks(scope) == 2  # at steps 100 and 200
    with gradscope.watch(model, opt, out=out, name="costly", tensorboard=False) as scope:
        train(model, opt, 100)
        scope._flusher.cost = 1.0  # the last flush took 1 s: no other within 1 / 2% = 50 s
        assert scope._flusher.gap() == 50.0
        train(model, opt, 150)
        assert _chunks(scope) == 1
    monkeypatch.setattr(flusher_mod, "FLUSH_MIN_SECS", 1e9)
    monkeypatch.setattr(flusher_mod, "FLUSH_MAX_STEPS", 120)
    with gradscope.watch(model, opt, out=out, name="cap", tensorboard=False) as scope:
        train(model, opt, 230)
        assert _chunks(scope) == 2  # at 100 (the first) and 220, however little time passed


def test_explicit_flush_every_is_exact(out, monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monkeypatch.setattr(flusher_mod, "FLUSH_MIN_SECS", 1e9)
    with gradscope.watch(model, opt, out=out, flush_every=20, tensorboard=False) as scope:
        train(model, opt, 50)
        assert _chunks(scope) == 2


def test_trailing_stats_of_dense_columns_match_the_definition():
    """The all-columns-at-once path of trailing_stats (columns finite on every row) gives
    exactly the per-row definition: median, MAD and max of the ``window`` rows before."""
    import numpy as np

    from gradscope.rules.base import trailing_stats

    rng = np.random.default_rng(0)
    for _ in range(15):
        t, n = int(rng.integers(1, 120)), int(rng.integers(1, 12))
        window, min_obs = int(rng.integers(2, 40)), int(rng.integers(1, 8))
        v = rng.standard_normal((t, n))
        need = rng.random(t) > 0.3
        med, mad, top = trailing_stats(v, window, min_obs, need)
        for i in range(t):
            if not need[i] or i < min_obs:
                assert np.isnan(med[i]).all()
                continue
            h = v[max(0, i - window) : i]
            m = np.median(h, axis=0)
            assert (med[i] == m).all() and (top[i] == h.max(axis=0)).all()
            assert (mad[i] == np.median(np.abs(h - m), axis=0)).all()


def test_max_abs_of_many_small_tensors_matches_a_loop():
    from gradscope.probes import numerics

    ts = [torch.randn(16, 16) for _ in range(6)]
    ts += [torch.randn(3, dtype=torch.bfloat16), torch.zeros(0), torch.randn(5000)]
    ts += [torch.randn(4, dtype=torch.complex64), torch.randn(7, dtype=torch.float64)]
    ts[0][0, 0] = float("nan")
    ts[1][0, 0] = -float("inf")
    got = numerics.max_abs(ts)
    want = [t.abs().max().item() if t.numel() else 0.0 for t in ts]
    assert torch.isnan(got[0]) and got[1].item() == float("inf")
    assert got[2:].tolist() == pytest.approx(want[2:], rel=0, abs=0)


def test_site_statistics_of_a_step_are_one_write(out):
    """Every site's raw statistics of a sampled step go to the buffer as one stacked tensor
    (per device), whatever the number of sites."""
    model = mlp(depth=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, out=out, flush_every=1000, tensorboard=False) as scope:
        train(model, opt, 1)
        row = scope._rec.buffer.rows[0]
        site_writes = [v for g, v in row.writes.items() if v.numel() > 40]
        assert len(site_writes) == 1  # (the other writes: gradient norms, weights, loss...)
    run = gradscope.load_run(scope.run_dir)
    fracs = run.wide("act_dead_fraction").iloc[0]
    assert fracs.notna().all() and ((fracs >= 0) & (fracs <= 1)).all()
