"""Every dtype a model can hold, against a float64 oracle.

Each case trains a small model twice from the same seed: once plain, with the oracle's own hooks
reading the very tensors gradscope reads (the gradients before the step, the weights before and
after it, each activation module's output and the gradient arriving at it) and computing every
statistic in float64; once under ``gradscope.watch``. Watching changes nothing, so both runs see
the same tensors: every recorded metric must match the oracle, and the final weights must be
bit-identical.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradscope

STEPS = 4
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid)


class Mixed(nn.Module):
    """float64 first layer, float32 after it: two dtypes in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8).double()
        self.act = nn.Tanh()
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x.double())).float())


class ComplexLayer(nn.Module):
    """A complex weight matrix (a unitary-RNN-style layer), read out through its moduli."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.complex64) / 3)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.complex64) @ self.w
        return self.head(self.act(z.abs() - 0.3))


class SparseBag(nn.Module):
    """An embedding with sparse gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=True)
        self.act = nn.Sigmoid()
        self.head = nn.Linear(6, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.emb(idx).mean(1)))


def _mlp(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Linear(8, 3),
    ).to(dtype)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).to(memory_format=torch.channels_last)


def _dense(dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    # scaled up so that some tanh/sigmoid units saturate and some ReLU units die
    return lambda i: (torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) * 3).to(dtype)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], float]] = {
    # name: (model, batch of step i, relative tolerance)
    "float64": (lambda: _mlp(torch.float64), _dense(torch.float64), 1e-9),
    "float32": (lambda: _mlp(torch.float32), _dense(torch.float32), 1e-4),
    "bfloat16": (lambda: _mlp(torch.bfloat16), _dense(torch.bfloat16), 2e-3),
    "float16": (lambda: _mlp(torch.float16), _dense(torch.float16), 2e-3),
    "mixed": (Mixed, _dense(torch.float32), 1e-4),
    "complex": (ComplexLayer, _dense(torch.float32), 1e-4),
    "sparse": (
        SparseBag,
        lambda i: torch.randint(0, 20, (16, 5), generator=torch.Generator().manual_seed(i)),
        1e-4,
    ),
    "channels_last": (
        _cnn,
        lambda i: torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)).to(
            memory_format=torch.channels_last
        ),
        1e-4,
    ),
}


def _loss(out: torch.Tensor, i: int) -> torch.Tensor:
    target = torch.randint(0, 3, (out.shape[0],), generator=torch.Generator().manual_seed(99 + i))
    return nn.functional.cross_entropy(out.float(), target)


def _w64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().values()
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def _unit_axis(out: torch.Tensor) -> int:
    return 1  # [B, F] features, [B, C, H, W] channels


class Oracle:
    """Float64 statistics of one plain training run (no gradscope)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        self.step = 0

    def put(self, metric: str, name: str, value: float) -> None:
        self.values[(metric, name)][self.step] = value

    def act_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            o = out.detach().to(torch.float64)
            n = o.numel()
            self.put("act_mean", name, float(o.mean()))
            self.put("act_std", name, float(o.std()))
            if isinstance(module, nn.ReLU):
                dims = [d for d in range(o.dim()) if d != _unit_axis(o)]
                dead = (o <= 0).all(dim=tuple(dims))
                self.put("act_dead_fraction", name, float(dead.double().mean()))
            elif isinstance(module, nn.Tanh):
                self.put("act_saturation", name, float((o.abs() > 0.99).sum()) / n)
            else:
                self.put("act_saturation", name, float(((o - 0.5).abs() > 0.49).sum()) / n)
            if out.requires_grad:
                step = self.step
                out.register_hook(
                    lambda g: self.values[("output_grad_norm", name)].__setitem__(
                        step, float(torch.linalg.vector_norm(_w64(g)))
                    )
                )

        return hook


def _train(
    make: Callable[[], nn.Module],
    batch: Callable[[int], torch.Tensor],
    oracle: Oracle | None,
    out_dir: object = None,
) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = make()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    handles = []
    if oracle is not None:
        for name, m in model.named_modules():
            if isinstance(m, ACTIVATIONS):
                handles.append(m.register_forward_hook(oracle.act_hook(name)))
    scope = None
    if out_dir is not None:
        scope = gradscope.watch(
            model,
            opt,
            out=out_dir,
            name="run",
            activation_every=1,
            update_every=1,
            flush_every=3,
            quiet=True,
            report=False,
            tensorboard=False,
        )
    for i in range(STEPS):
        opt.zero_grad()
        loss = _loss(model(batch(i)), i)
        loss.backward()
        if oracle is not None:
            oracle.put("loss", "(run)", float(loss.detach().double()))
            total = 0.0
            before = {}
            for name, p in params.items():
                g = _w64(p.grad)
                norm = float(torch.linalg.vector_norm(g))
                total += norm**2
                oracle.put("grad_norm", name, norm)
                oracle.put("grad_max_abs", name, float(g.abs().max()))
                oracle.put("grad_nonfinite", name, 0.0)
                before[name] = _w64(p).clone()
                oracle.put("weight_norm", name, float(torch.linalg.vector_norm(before[name])))
            oracle.put("grad_norm_total", "(run)", math.sqrt(total))
        opt.step()
        if oracle is not None:
            for name, p in params.items():
                w = float(torch.linalg.vector_norm(before[name]))
                delta = float(torch.linalg.vector_norm(before[name] - _w64(p)))
                if w > 1e-12:
                    oracle.put("update_ratio", name, delta / w)
            oracle.step += 1
    for h in handles:
        h.remove()
    if scope is not None:
        scope.close()
    return model, scope


EXPECTED = {  # metrics each case must have recorded (so the comparison cannot pass empty)
    "float64": {
        "grad_norm",
        "grad_max_abs",
        "weight_norm",
        "update_ratio",
        "act_mean",
        "act_std",
        "act_dead_fraction",
        "act_saturation",
        "output_grad_norm",
        "loss",
        "grad_norm_total",
        "grad_nonfinite",
    },
    "mixed": {
        "grad_norm",
        "grad_max_abs",
        "weight_norm",
        "update_ratio",
        "act_mean",
        "act_std",
        "act_saturation",
        "output_grad_norm",
        "loss",
        "grad_norm_total",
    },
    "complex": {
        "grad_norm",
        "grad_max_abs",
        "weight_norm",
        "update_ratio",
        "act_dead_fraction",
        "loss",
    },
    "sparse": {
        "grad_norm",
        "grad_max_abs",
        "weight_norm",
        "update_ratio",
        "act_saturation",
        "loss",
    },
    "channels_last": {
        "grad_norm",
        "weight_norm",
        "update_ratio",
        "act_dead_fraction",
        "act_saturation",
        "output_grad_norm",
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_metric_matches_a_float64_oracle(case, out):
    make, batch, rel = CASES[case]
    oracle = Oracle()
    plain, _ = _train(make, batch, oracle)
    watched, scope = _train(make, batch, None, out)
    for (name, p), (_, q) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(p, q), f"{name}: watching changed the training"
    run = scope.load()
    assert run.meta["status"] == "completed" and run.meta["steps"] == STEPS
    assert not [e for e in run.events if e.get("event") == "internal_error"], run.events
    recorded = set(run.metrics["metric"].unique())
    assert EXPECTED.get(case, EXPECTED["float64"]) <= recorded
    compared = 0
    for metric in sorted(recorded):
        table = run.wide(metric)
        for name in table.columns:
            expect = oracle.values.get((metric, name))
            if expect is None:
                continue  # a module the oracle does not hook (output_grad_norm of Linears)
            for step, got in table[name].dropna().items():
                want = expect[int(step)]
                assert got == pytest.approx(want, rel=rel, abs=1e-7 if rel > 1e-6 else 1e-12), (
                    f"{case}: {metric} of {name} at step {step}"
                )
                compared += 1
    missing = {
        key
        for key in oracle.values
        if key[0] in recorded
        and key[1] not in run.wide(key[0]).columns
        and key[0] != "output_grad_norm"
    }
    assert not missing, f"{case}: not recorded: {sorted(missing)}"
    assert compared >= 20


@pytest.mark.slow
def test_a_float64_lstm_trained_by_lbfgs_runs_unchanged_under_gradscope_run(tmp_path):
    """pytorch/examples' time_sequence_prediction, in small: same output as python, and a run
    directory with its float64 statistics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "double_lstm_lbfgs.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    plain = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=180
    )
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--out",
            str(tmp_path),
            "--name",
            "run",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert (got.returncode, got.stdout) == (plain.returncode, plain.stdout) == (0, plain.stdout)
    assert "internal error" not in got.stderr and "Traceback" not in got.stderr
    run = gradscope.load_run(tmp_path / "run")
    assert run.meta["status"] == "completed" and run.meta["steps"] == 2
    norms = run.wide("grad_norm")
    assert {"lstm1.weight_ih", "lstm2.weight_hh", "linear.weight"} <= set(norms.columns)
    assert norms.notna().all().all() and (norms > 0).all().all()
    assert run.wide("output_grad_norm").notna().any().any()
