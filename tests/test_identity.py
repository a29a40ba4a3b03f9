"""Watching changes nothing: same seed, with and without gradscope, bit-identical weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope

from models import CNN, LSTMNet, MnistNet, TinyTransformer, mlp, train


def _data(kind, i):
    g = torch.Generator().manual_seed(i)
    if kind == "mlp":
        return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    if kind == "cnn":
        return torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    if kind == "mnist":  # functional activations (F.relu): measured through a TorchFunctionMode
        return torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
    if kind == "lstm":
        return torch.randn(8, 5, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    idx = torch.randint(0, 32, (4, 12), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


MODELS = {
    "mlp": mlp,
    "cnn": CNN,
    "lstm": LSTMNet,
    "transformer": TinyTransformer,
    "mnist": MnistNet,
}


def _loss(logits, y):  # per token for the transformer
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _train(kind, watch, out, steps=8, **options):
    torch.manual_seed(1234)
    model = MODELS[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scope = gradscope.watch(model, out=out, activation_every=1, **options) if watch else None
    try:
        train(model, opt, steps, make=lambda seed: _data(kind, seed), loss_fn=_loss)
    finally:
        if scope is not None:
            scope.close()
    return model.state_dict(), torch.get_rng_state(), scope


@pytest.mark.parametrize("trace", ["auto", "always"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bit_identical_weights_and_rng(kind, trace, out):
    plain, rng_plain, _ = _train(kind, False, out)
    watched, rng_watched, scope = _train(kind, True, out, trace_nonfinite=trace)
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name
    assert torch.equal(rng_plain, rng_watched), "gradscope consumed random numbers"
    run = scope.load()
    assert run.meta["steps"] == 8 and len(run.wide("grad_norm")) == 8
    assert not run.wide("act_mean").empty
    if kind == "mnist":  # the functional sites were measured at every step
        assert list(run.wide("act_dead_fraction").columns) == [
            "conv1:relu",
            "conv2:relu",
            "fc1:relu",
        ]
        assert len(run.wide("act_dead_fraction")) == 8
