"""Hooks registered before a compiled model's first call keep working under torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope

from models import batch, compile_keeps_optimizer_hooks, mlp, train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not compile_keeps_optimizer_hooks(),
        reason="torch 2.2's torch.compile strips optimizer step hooks process-wide (torch >= 2.3)",
    ),
]


def _run(out, compile_when, steps=4):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = model
    if compile_when == "before":  # watch the compiled module (an OptimizedModule)
        target = torch.compile(model, backend="eager")
    with gradscope.watch(target, out=out, activation_every=2) as scope:
        run_model = target
        if compile_when == "after":  # compile the watched model before its first call
            run_model = torch.compile(model, backend="eager")
        if compile_when == "inplace":  # Module.compile(): the same module, compiled in place
            model.compile(backend="eager")
        train(run_model, opt, steps)
    return scope.load()


@pytest.mark.parametrize(
    "compile_when",
    [
        "before",
        "after",
        # dynamo, tracing the hooks of an in-place compiled module on their own, reads .grad of a
        # non-leaf tensor and warns (torch's own warning, inside dynamo): not gradscope's to fix
        pytest.param(
            "inplace",
            marks=pytest.mark.filterwarnings(
                "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
            ),
        ),
    ],
)
def test_compiled_records_match_eager(out, compile_when):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _run(out / "eager", None)
    compiled = _run(out / "compiled", compile_when)
    assert compiled.meta["steps"] == 4
    for metric in ("grad_norm", "act_dead_fraction", "act_mean", "update_ratio"):
        a, b = eager.wide(metric), compiled.wide(metric)
        assert list(a.index) == list(b.index), metric
        assert b.to_numpy() == pytest.approx(a.to_numpy(), rel=1e-5), metric
    assert list(compiled.wide("act_mean").index) == [0, 2]  # the sampling switch still works
    # names come from the original module, not from OptimizedModule's "_orig_mod." prefix
    assert "0.weight" in compiled.wide("grad_norm").columns
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def _late_watch(out, reset):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        x, y = batch(seed=i)
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()

    step(0)  # compiled and called before watch(): its graph has no hooks
    with gradscope.watch(model, out=out, activation_every=1, quiet=True) as scope:
        if reset:
            torch._dynamo.reset()  # the documented way out: recompile with the hooks
        for i in range(1, 5):
            step(i)
    return scope.load()


def test_hooks_added_after_the_first_compiled_call_are_reported_not_trusted(out):
    with pytest.warns(RuntimeWarning, match="no forward hook has run in 3 steps"):
        run = _late_watch(out / "late", reset=False)
    assert [e["event"] for e in run.events if e["event"] == "hooks_inactive"] == ["hooks_inactive"]
    assert "act_mean" not in set(run.metrics["metric"])  # nothing measured, nothing invented
    assert run.meta["steps"] == 4 and "grad_norm" in set(run.metrics["metric"])
    fixed = _late_watch(out / "reset", reset=True)  # no warning (warnings are errors here)
    assert "act_mean" in set(fixed.metrics["metric"])
    assert not [e for e in fixed.events if e["event"] == "hooks_inactive"]


class _Functional(nn.Module):
    """Activations as function calls (F.relu, torch.tanh): measured by a TorchFunctionMode in
    eager forwards, never inside a compiled one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(nn.functional.relu(self.fc1(x)))))


def _compiled_functional(out, compile_when, functional):
    """Graphs compiled and graph breaks over 4 steps, and the run."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Functional()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if compile_when == "part":  # an eager model holding a compiled submodule
        model.fc2 = torch.compile(model.fc2, backend="eager")
    target = torch.compile(model, backend="eager") if compile_when == "before" else model
    options = {"activation_every": 2, "quiet": True, "functional_activations": functional}
    with gradscope.watch(target, out=out, **options) as scope:
        run_model = target
        if compile_when == "after":
            run_model = torch.compile(model, backend="eager")
        if compile_when == "inplace":
            model.compile(backend="eager")
        train(run_model, opt, 4)
        if functional:
            assert scope.parts.recorder.modules.functional.spans == 0  # never with dynamo
    assert torch._C._len_torch_function_stack() == 0
    graphs = counters["stats"]["unique_graphs"]
    return graphs, sum(counters["graph_break"].values()), scope.load()


# dynamo, tracing the hooks of a module compiled on its own, reads .grad of a non-leaf tensor
# and warns (torch's own warning, as in the in-place case above)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("compile_when", ["before", "after", "inplace", "part"])
def test_functional_activations_neither_break_nor_recompile_a_compiled_model(out, compile_when):
    graphs_off, _, _ = _compiled_functional(out / "off", compile_when, False)
    graphs, breaks, run = _compiled_functional(out / "on", compile_when, True)
    assert breaks == 0
    assert graphs == graphs_off  # the sampled steps compiled nothing more
    assert run.meta["steps"] == 4 and "grad_norm" in set(run.metrics["metric"])
    assert not [e for e in run.meta["layers"] if e.get("functional")]
