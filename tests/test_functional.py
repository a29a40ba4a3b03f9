"""Activations called as functions inside forward() (F.relu, torch.sigmoid, x.tanh()), against
layers built to known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.probes.functional import OPS

from models import MnistNet, half_dead_linear


def _stack() -> int:
    return int(torch._C._len_torch_function_stack())


def _global_hooks() -> int:
    m = nn.modules.module
    return len(m._global_forward_pre_hooks) + len(m._global_forward_hooks)


class HalfDead(nn.Module):
    """fc1 with units 0-3 alive for every input in [0, 1) and units 4-7 always negative, then
    an activation applied as a function: a dead fraction of exactly 0.5 after a ReLU."""

    def __init__(self, act=F.relu) -> None:
        super().__init__()
        self.fc1 = half_dead_linear()[0]
        self.fc2 = nn.Linear(8, 2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _no_activations(run) -> bool:
    return "act_dead_fraction" not in set(run.metrics["metric"])


def _steps(model, scope_kwargs, out, steps=4, lr=0.0, x=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gradscope.watch(model, out=out, quiet=True, report=False, **scope_kwargs) as scope:
        for i in range(steps):
            g = torch.Generator().manual_seed(i)
            inp = torch.rand(16, 4, generator=g) if x is None else x
            opt.zero_grad()
            F.cross_entropy(model(inp), torch.randint(0, 2, (16,), generator=g)).backward()
            opt.step()
    return scope


def test_functional_relu_after_half_dead_layer_is_exactly_half_dead(out):
    # half dead is below the default dead_fraction (0.6): lowered to see the finding
    scope = _steps(HalfDead(), {"activation_every": 1, "thresholds": {"dead_fraction": 0.5}}, out)
    run = scope.load()
    dead = run.wide("act_dead_fraction")
    assert list(dead.columns) == ["fc1:relu"]
    assert (dead["fc1:relu"] == 0.5).all()
    [finding] = [f for f in run.findings if f["kind"] == "dead_units"]
    assert finding["layer"] == "fc1:relu"
    assert "fc1:relu (F.relu after fc1)" in finding["message"]
    # a function call cannot be swapped: the suggestion edits the code instead
    assert "swap=" not in finding["suggestion"].replace("for swap= to", "")
    assert "F.leaky_relu(x, 0.01) instead of F.relu(x)" in finding["suggestion"]
    [entry] = [e for e in run.meta["layers"] if e.get("functional")]
    assert entry == {
        "name": "fc1:relu",
        "kind": "module",
        "type": "ReLU",
        "family": "rectifier",
        "executed": True,
        "functional": "F.relu",
        "anchor": "fc1",
        "within": "(root)",
    }
    names = [e["name"] for e in run.meta["layers"] if e["kind"] == "module"]
    assert names == ["fc1", "fc1:relu", "fc2"]  # in forward order, right after its layer


@pytest.mark.parametrize(
    ("act", "label"),
    [
        (torch.relu, "torch.relu"),
        (lambda x: x.relu(), "Tensor.relu"),
        (lambda x: x.clone().relu_(), "Tensor.relu_"),
        (lambda x: F.relu(x.clone(), inplace=True), "F.relu"),
    ],
)
def test_every_form_of_relu(act, label, out):
    run = _steps(HalfDead(act), {"activation_every": 1}, out, steps=1).load()
    assert run.wide("act_dead_fraction").loc[0, "fc1:relu"] == 0.5
    assert [e["functional"] for e in run.meta["layers"] if e.get("functional")] == [label]


def test_functional_results_are_the_originals(out):
    torch.manual_seed(0)
    model = MnistNet().eval()  # no dropout: two calls give the same result
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        plain = model(x)
    with gradscope.watch(model, out=out, quiet=True, report=False) as scope:
        watched = model(x)
        assert scope.parts.recorder.modules.functional.spans == 1
    assert torch.equal(plain, watched.detach())


class Saturating(nn.Module):
    """fc1 = identity on 2 features; column 0 of the input is huge, column 1 small: exactly
    half of the outputs of a sigmoid/tanh on it are saturated. A layer follows (hidden)."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(2))
            self.fc1.bias.zero_()
        self.fc2 = nn.Linear(2, 2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    ("act", "site", "label"),
    [
        (torch.sigmoid, "fc1:sigmoid", "torch.sigmoid"),
        (lambda x: x.sigmoid(), "fc1:sigmoid", "Tensor.sigmoid"),
        (torch.tanh, "fc1:tanh", "torch.tanh"),
        (lambda x: x.tanh(), "fc1:tanh", "Tensor.tanh"),
    ],
)
def test_sigmoid_and_tanh_saturation(act, site, label, out):
    x = torch.zeros(16, 2)
    x[:, 0] = 50.0  # pinned at the limit
    x[:, 1] = 0.01  # near 0.5 / 0
    run = _steps(Saturating(act), {"activation_every": 1}, out, x=x).load()
    sat = run.wide("act_saturation")
    assert list(sat.columns) == [site] and (sat[site] == 0.5).all()
    [finding] = [f for f in run.findings if f["kind"] == "saturation"]
    assert finding["layer"] == site and f"({label} after fc1)" in finding["message"]
    assert "swap=" not in finding["suggestion"]
    assert f"call F.relu instead of {label}" in finding["suggestion"]


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x)  # nothing ran in this forward yet: the enclosing module names it
        return F.gelu(self.lin(h))  # after lin


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.block = Nested()
        self.act = nn.ReLU()  # a module: measured by the module probe, once
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.inp(x))
        return self.out(self.act(x))


def test_attribution_to_the_anchor_or_the_enclosing_module(out):
    torch.manual_seed(0)
    run = _steps(Outer(), {"activation_every": 1}, out, steps=2).load()
    layers = {e["name"]: e for e in run.meta["layers"] if e["kind"] == "module"}
    assert list(layers) == ["inp", "block:relu", "block.lin", "block.lin:gelu", "act", "out"]
    assert layers["block:relu"]["anchor"] is None and layers["block:relu"]["within"] == "block"
    assert layers["block.lin:gelu"]["anchor"] == "block.lin"
    assert layers["block.lin:gelu"]["type"] == "GELU"
    # nn.ReLU calls F.relu: one site, the module's
    assert sorted(run.wide("act_mean").columns) == ["act", "block.lin:gelu", "block:relu"]


def test_same_function_after_one_layer_at_two_widths_gets_two_sites(out):
    class TwoWidths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.head(torch.cat([F.relu(h), F.relu(h[:, :4])], 1))

    run = _steps(TwoWidths(), {"activation_every": 1}, out, steps=1).load()
    assert list(run.wide("act_dead_fraction").columns) == ["fc:relu", "fc:relu#1"]


def test_calls_of_one_step_pool_a_unit_is_dead_only_if_dead_in_every_call(out):
    model = HalfDead()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out, quiet=True, report=False) as scope:
        opt.zero_grad()
        a = model(torch.rand(8, 4))
        with torch.no_grad():
            model.fc1.bias[4] = 100.0  # unit 4 alive in the second call only
        b = model(torch.rand(8, 4))
        (a.sum() + b.sum()).backward()
        opt.step()
    assert scope.load().wide("act_dead_fraction").loc[0, "fc1:relu"] == 3 / 8


def test_nothing_is_intercepted_on_unsampled_steps(out):
    seen: list[int] = []

    class Spy(HalfDead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(_stack())
            return super().forward(x)

    scope = _steps(Spy(), {"activation_every": 2}, out, steps=4)
    assert seen == [1, 0, 1, 0]  # the mode only on sampled steps
    assert list(scope.load().wide("act_dead_fraction").index) == [0, 2]
    assert _stack() == 0


def test_grad_disabled_measures_nothing(out):
    model = HalfDead()
    with gradscope.watch(model, out=out, quiet=True, report=False) as scope:
        with torch.no_grad():
            model(torch.rand(4, 4))
        assert scope.parts.recorder.modules.functional.spans == 0
    assert _no_activations(scope.load())


def test_switched_off(out):
    scope = _steps(HalfDead(), {"functional_activations": False, "activation_every": 1}, out)
    assert scope.parts.recorder.modules.functional is None
    run = scope.load()
    assert _no_activations(run)
    assert not [e for e in run.meta["layers"] if e.get("functional")]


def test_no_mode_or_hook_left_after_a_forward_that_raised_and_after_close(out):
    class Raises(HalfDead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            if x.shape[0] == 3:
                raise ValueError("user error")
            return y

    model = Raises()
    before = _global_hooks()
    scope = gradscope.watch(model, out=out, quiet=True, report=False, activation_every=1)
    with pytest.raises(ValueError, match="user error"):
        model(torch.rand(3, 4))
    assert _stack() == 0 and _global_hooks() == before
    model(torch.rand(4, 4)).sum().backward()  # the next forward is measured as usual
    scope.close()
    assert _stack() == 0 and _global_hooks() == before
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model._forward_hooks_always_called


def test_an_internal_error_returns_the_original_result_and_switches_the_part_off(
    out, monkeypatch, capsys
):
    from gradscope.probes.activations import ModuleProbe

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(ModuleProbe, "measure", broken)
    torch.manual_seed(0)
    model = MnistNet().eval()  # no dropout: two calls give the same result
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        plain = model(x)
    with gradscope.watch(model, out=out, report=False) as scope:
        got = model(x)
        assert _stack() == 0
        got2 = model(x)
    assert torch.equal(plain, got.detach()) and torch.equal(plain, got2.detach())
    said = [line for line in capsys.readouterr().err.splitlines() if "internal error" in line]
    assert len(said) == 1 and "in functional:" in said[0]
    errors = [e for e in scope.load().events if e.get("event") == "internal_error"]
    assert [(e["where"], e["part"]) for e in errors] == [("functional", "functional")]


def test_swap_refuses_a_functional_site_and_says_why(out):
    options = {
        "activation_every": 1,
        "swap": "relu->leaky_relu:0.01",
        "thresholds": {"dead_fraction": 0.5},
    }
    scope = _steps(HalfDead(), options, out)
    [finding] = [f for f in scope.load().findings if f["kind"] == "dead_units"]
    [action] = finding["remedies"]
    assert action["action"] == "not_applied"
    assert "F.relu() called inside forward()" in action["reason"]


def test_exclude_filters_apply_to_functional_sites(out):
    run = _steps(HalfDead(), {"activation_every": 1, "exclude_types": ("ReLU",)}, out).load()
    assert _no_activations(run)
    run = _steps(HalfDead(), {"activation_every": 1, "exclude": ("fc1",)}, out).load()
    assert _no_activations(run)


def test_a_model_holding_a_compiled_submodule_is_left_alone(out):
    model = HalfDead()
    model.fc1.compile = None  # type: ignore[assignment]  (not Module.compile: stays eager)
    model.fc1.__dict__["_compiled_call_impl"] = None
    with gradscope.watch(model, out=out, quiet=True, report=False) as scope:
        model.fc1.__dict__["_compiled_call_impl"] = model.fc1._call_impl  # as compile() does
        model(torch.rand(4, 4)).sum().backward()
        assert scope.parts.recorder.modules.functional.spans == 0


def test_the_ops_table_knows_every_form():
    labels = {op.label for op in OPS.values()}
    for label in ("F.relu", "torch.relu", "Tensor.relu", "Tensor.relu_", "F.gelu", "F.silu"):
        assert label in labels
    for label in ("torch.sigmoid", "Tensor.sigmoid", "torch.tanh", "Tensor.tanh", "F.mish"):
        assert label in labels
    assert OPS[torch.Tensor.relu].type == "ReLU" and OPS[F.leaky_relu].type == "LeakyReLU"


def test_recycle_reinitialises_the_dead_units_of_a_functional_site(out):
    options = {"activation_every": 1, "recycle": True, "thresholds": {"dead_fraction": 0.5}}
    scope = _steps(HalfDead(), options, out, steps=6)
    [finding] = [f for f in scope.load().findings if f["kind"] == "dead_units"]
    recycled = [a for a in finding["remedies"] if a["action"] == "recycled"]
    assert recycled and recycled[0]["layer"] == "fc1:relu"
    assert (recycled[0]["units"], recycled[0]["of"]) == (4, 8)  # units 4-7, fed by fc1
