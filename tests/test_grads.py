"""Gradient, weight and update statistics against oracles (torch.linalg.vector_norm & co)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope

from models import batch, mlp


def _norms(model):
    return {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}


def test_grad_norms_total_and_max_abs_match_oracles(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected, totals, peaks = [], [], []
    with gradscope.watch(model, out=out, activation_every=3) as scope:
        for i in range(7):
            x, y = batch(seed=i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            expected.append(_norms(model))
            totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())
            peaks.append({n: p.grad.abs().max().item() for n, p in model.named_parameters()})
            opt.step()
    run = scope.load()
    norms = run.wide("grad_norm")
    assert list(norms.index) == list(range(7))
    for step, exp in enumerate(expected):
        for name, value in exp.items():
            assert norms.loc[step, name] == pytest.approx(value, rel=1e-5)
    total = run.wide("grad_norm_total")["(run)"]
    assert total.tolist() == pytest.approx(totals, rel=1e-5)
    max_abs = run.wide("grad_max_abs")
    # sampled steps only: update_every defaults to twice activation_every
    assert list(max_abs.index) == [0, 6]
    for step in (0, 6):
        for name, value in peaks[step].items():
            assert max_abs.loc[step, name] == pytest.approx(value, rel=1e-6)
    counts = run.wide("grad_nonfinite")
    assert (counts.to_numpy() == 0).all() and counts.shape == norms.shape


def test_weight_norm_and_update_ratio_match_hand_calculation(out):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before, after = {}, {}
    with gradscope.watch(model, out=out, activation_every=2, update_every=2) as scope:
        for i in range(4):
            x, y = batch(seed=i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            before[i] = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            after[i] = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = scope.load()
    wn, ur = run.wide("weight_norm"), run.wide("update_ratio")
    assert list(wn.index) == [0, 2] and list(ur.index) == [0, 2]
    for step in (0, 2):
        for name, w0 in before[step].items():
            norm = torch.linalg.vector_norm(w0).item()
            delta = torch.linalg.vector_norm(w0 - after[step][name]).item()
            assert wn.loc[step, name] == pytest.approx(norm, rel=1e-5)
            assert ur.loc[step, name] == pytest.approx(delta / norm, rel=1e-4)


def test_update_ratio_left_out_for_zero_weights(out):
    model = nn.Sequential(nn.Linear(8, 4))
    nn.init.zeros_(model[0].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out) as scope:
        x, y = batch()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ur = scope.load().metrics.query("metric == 'update_ratio'")
    assert set(ur["layer"]) == {"0.weight"}  # the zero bias has no defined ratio: left out
    assert ur["value"].map(math.isfinite).all()


def test_nonfinite_gradients_counted_exactly(out):
    model = nn.Sequential(nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out) as scope:
        for i in range(3):
            opt.zero_grad()
            x, y = batch(seed=i)
            nn.functional.cross_entropy(model(x), y).backward()
            if i == 1:
                model[0].weight.grad[0, :3] = float("nan")
                model[0].weight.grad[1, 0] = float("inf")
            opt.step()
            with torch.no_grad():  # SGD applied the NaNs: repair, so step 2 is clean again
                model[0].weight.nan_to_num_(0.0, 0.0, 0.0)
    run = scope.load()
    counts = run.wide("grad_nonfinite")
    assert counts.loc[1, "0.weight"] == 4 and counts.loc[1, "0.bias"] == 0
    assert counts.loc[0, "0.weight"] == 0 and counts.loc[2, "0.weight"] == 0
    assert math.isnan(run.wide("grad_norm").loc[1, "0.weight"])


def test_overflowing_norm_of_finite_values_is_not_a_nonfinite_count(out):
    model = nn.Sequential(nn.Linear(1000, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out) as scope:
        opt.zero_grad()
        model(torch.ones(1, 1000)).sum().backward()
        model[0].weight.grad.fill_(1e19)  # finite, but the fp32 sum of squares overflows
        opt.step()
    run = scope.load()
    assert math.isinf(run.wide("grad_norm").loc[0, "0.weight"])
    assert run.wide("grad_nonfinite").loc[0, "0.weight"] == 0


def test_half_precision_grads_norm_in_float32(out):
    model = nn.Sequential(nn.Linear(128, 128, bias=False)).to(torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out) as scope:
        opt.zero_grad()
        model[0].weight.grad = torch.full((128, 128), 1000.0, dtype=torch.float16)
        opt.step()
    # 128000 is past fp16's largest value (65504): a norm accumulated in fp16 would be inf
    assert scope.load().wide("grad_norm").loc[0, "0.weight"] == pytest.approx(128000.0, rel=1e-3)


def test_filters_by_name_and_type(out):
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out, exclude=["*.bias", "2"], exclude_types=["ReLU"]) as s:
        x, y = batch()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    layers = set(s.load().metrics["layer"])
    assert "0.weight" in layers and "4.weight" in layers
    assert not any(name.endswith(".bias") for name in layers)
    assert "2.weight" not in layers  # excluded through its module's name
    assert not {"1", "3", "5"} & layers  # ReLUs excluded by type
    with gradscope.watch(model, out=out, include=["0*"], include_types=[nn.Linear]) as s2:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert set(s2.load().metrics.query("kind == 'param'")["layer"]) == {"0.weight", "0.bias"}


def test_tied_weights_counted_once_and_named_twice(out):
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=out) as scope:
        opt.zero_grad()
        logits = model(torch.randint(0, 10, (4, 3)))
        nn.functional.cross_entropy(logits.reshape(-1, 10), torch.randint(0, 10, (12,))).backward()
        expected = torch.linalg.vector_norm(emb.weight.grad).item()
        opt.step()
    run = scope.load()
    grads = run.wide("grad_norm")
    assert list(grads.columns) == ["0.weight"]
    assert grads.loc[0, "0.weight"] == pytest.approx(expected, rel=1e-6)
    entry = next(e for e in run.meta["layers"] if e["name"] == "0.weight")
    assert entry["aliases"] == ["1.weight"]


def test_sparse_gradients(out):
    emb = nn.Embedding(50, 8, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.01)
    with gradscope.watch(emb, out=out) as scope:
        opt.zero_grad()
        emb(torch.tensor([[1, 2, 2, 7]])).pow(2).sum().backward()
        expected = torch.linalg.vector_norm(emb.weight.grad.coalesce().values()).item()
        opt.step()
    assert scope.load().wide("grad_norm").loc[0, "weight"] == pytest.approx(expected, rel=1e-6)
