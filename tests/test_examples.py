"""Every example is diagnosed right, and the healthy baselines stay silent.

The examples are plain PyTorch scripts (no gradscope import). Each defines ``build_model()``,
called once by ``main()``; here it is wrapped so the model it returns is watched, which is what
attaching to an unmodified script amounts to. Expectations come from each example's docstring
(what gradscope should report) and the ground truth the script prints.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import gradscope

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    """The examples are small: on a shared 2-core machine, two threads per process fight
    whatever else runs there (measured: 3 s runs took 40-100 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_example(name: str, out: Path, **options: Any) -> gradscope.Scope:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scopes: list[gradscope.Scope] = []
    build = module.build_model

    def watched_build():
        model = build()
        scopes.append(gradscope.watch(model, out=out, quiet=True, tensorboard=False, **options))
        return model

    module.build_model = watched_build
    try:
        module.main()
    finally:
        for scope in scopes:
            scope.close()
    assert len(scopes) == 1
    return scopes[0]


def kinds(scope: gradscope.Scope) -> list[tuple[str, str]]:
    return [(f["kind"], f["layer"]) for f in scope.findings]


def one(scope: gradscope.Scope, kind: str, layer: str | None = None) -> dict[str, Any]:
    found = [f for f in scope.findings if f["kind"] == kind and layer in (None, f["layer"])]
    assert found, f"no {kind} at {layer}: {kinds(scope)}"
    return found[0]


@pytest.mark.parametrize(
    "name", ["healthy_mlp", "healthy_cnn", "healthy_lstm", "healthy_transformer"]
)
def test_healthy_baselines_raise_nothing(name, out):
    scope = run_example(name, out, trace_nonfinite="always")
    assert scope.findings == []


def test_vanishing_sigmoid(out):
    scope = run_example("vanishing_sigmoid", out)
    f = one(scope, "vanishing_gradients", "0")
    assert f["first_step"] == 0 and f["evidence"]["first_last_ratio"] < 1e-6
    assert {k for k, _ in kinds(scope)} <= {"vanishing_gradients", "update_ratio_low", "saturation"}


def test_exploding_rnn(out):
    scope = run_example("exploding_rnn", out)
    f = one(scope, "exploding_gradients", "rnn.weight_hh_l0")
    assert f["evidence"]["peak_step"] == 67 and f["evidence"]["peak_ratio"] > 10


def test_dying_relu(out):
    scope = run_example("dying_relu", out)
    f = one(scope, "dead_units", "3")
    assert f["evidence"]["born_dead"] is False and f["evidence"]["dead_fraction"] > 0.5
    assert 0 < f["first_step"] <= 30
    assert "LeakyReLU" in f["suggestion"]


def test_born_dead_relu(out):
    scope = run_example("born_dead_relu", out)
    f = one(scope, "dead_units", "3")
    assert f["first_step"] == 0 and f["evidence"]["born_dead"] is True
    assert f["severity"] == "error"
    assert [k for k, _ in kinds(scope)] == ["dead_units"]  # downstream layers folded in


@pytest.mark.parametrize("trace", ["always", "auto"])
def test_nan_from_log_in_the_forward_pass(out, trace):
    scope = run_example("nan_log_forward", out, trace_nonfinite=trace)
    f = one(scope, "nonfinite")
    assert (f["phase"], f["first_step"]) == ("forward", 33)
    if trace == "always":
        assert (f["module"], f["class"], f["layer"]) == ("log_probs", "LogProbs", "log_probs")
        assert f["evidence"]["inputs_finite"] is True


@pytest.mark.parametrize("trace", ["always", "auto"])
def test_inf_created_in_the_backward_pass(out, trace):
    scope = run_example("inf_backward", out, trace_nonfinite=trace)
    f = one(scope, "nonfinite")
    assert (f["phase"], f["first_step"]) == ("backward", 30)
    if trace == "always":
        assert (f["module"], f["class"]) == ("norm", "Magnitude")


def test_divergence_from_a_too_large_learning_rate(out):
    scope = run_example("divergence_lr", out)
    assert one(scope, "exploding_gradients", "linear.weight")["first_step"] <= 12
    f = one(scope, "nonfinite")
    # the model output is finite at step 12; its square overflows inside mse_loss
    assert f["phase"] == "loss" and f["first_step"] == 12
    assert "diverged" in f["message"] and "learning rate" in f["suggestion"]


def test_poisoned_batch(out):
    scope = run_example("poisoned_batch", out)
    spike = one(scope, "loss_spike")
    assert (spike["first_step"], spike["last_step"]) == (120, 120)
    # one bad batch is one finding: its gradients spike because its loss does (the evidence
    # says so), not a second, exploding-gradients finding
    assert spike["evidence"]["gradients_spiked"] is True and "bad batch" in spike["message"]
    assert {k for k, _ in kinds(scope)} <= {"loss_spike", "update_ratio_low"}


def test_saturated_tanh(out):
    scope = run_example("saturated_tanh", out)
    layers = [layer for kind, layer in kinds(scope) if kind == "saturation"]
    assert layers[:1] == ["1"] and one(scope, "saturation", "1")["first_step"] == 0


def test_depthwise_explosion_in_a_relu_net(out):
    scope = run_example("depthwise_explosion_relu", out)
    f = one(scope, "exploding_gradients", "0")
    assert f["evidence"]["signal"] == "backward signal" and f["first_step"] == 0
