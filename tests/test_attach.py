"""Finding the models of code that never calls watch() (what `gradscope run` attaches with), in
process: discovery rules, names, several models, the script's own clipping, torch.save."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import nn

import gradscope
from gradscope import patches
from gradscope.attach import Attach
from gradscope.config import Config

from models import compile_keeps_optimizer_hooks


def _attach(out, **kw) -> Attach:
    return Attach(Config(out=out, quiet=True, **kw), ["gradscope", "run", "test"])


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _data(n: int = 16):
    return torch.randn(n, 6), torch.randint(0, 3, (n,))


def _param_names(run) -> set[str]:
    return {e["name"] for e in run.meta["layers"] if e["kind"] == "param"}


def test_the_first_training_forward_finds_the_whole_model_not_evaluation_or_the_loss(out):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    attach = _attach(out)
    with torch.no_grad():  # evaluation first: not a training step, nothing found yet
        model(x)
    with torch.inference_mode():
        model(x)
    assert attach.scope is None
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model(x)
    run_dir = attach.close("completed", 0)
    assert run_dir is not None
    run = gradscope.load_run(run_dir)
    assert run.meta["steps"] == 5 and run.meta["exit_code"] == 0
    assert run.meta["models"] == {"": "Sequential"}
    assert run.meta["command"] == "gradscope run test"
    assert _param_names(run) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not any("CrossEntropy" in e["type"] for e in run.meta["layers"])
    found = [e for e in run.events if e["event"] == "model_found"]
    assert found == [
        {
            "event": "model_found",
            "key": "",
            "type": "Sequential",
            "step": 0,
            "parameters": 123,
            "trainable": 123,
        }
    ]
    # the gradient norms are the real ones
    grads = run.metrics.query("metric == 'grad_norm' and step == 4").set_index("layer")["value"]
    assert grads["2.bias"] == pytest.approx(
        float(torch.linalg.vector_norm(model[2].bias.grad)), rel=1e-6
    )


def test_close_leaves_nothing_behind(out):
    before = (
        len(module_globals._global_forward_pre_hooks),
        nn.Module.compile,
        len(warnings.filters),
        torch.save,
    )
    model = _mlp()
    attach = _attach(out)
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    assert attach.scope is not None and patches.installed()
    attach.close("completed", 0)
    assert (
        len(module_globals._global_forward_pre_hooks),
        nn.Module.compile,
        len(warnings.filters),
        torch.save,
    ) == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_run_that_trains_nothing_still_leaves_a_run_directory(out):
    attach = _attach(out)
    nn.CrossEntropyLoss()(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))
    frozen = _mlp().requires_grad_(False)
    frozen(torch.randn(2, 6))
    run = gradscope.load_run(attach.close("failed", 1))
    assert run.meta["status"] == "failed" and run.meta["exit_code"] == 1
    assert run.meta["models"] == {} and "no model trained" in run.meta["note"]
    assert run.findings == [] and run.events[0]["event"] == "nothing_watched"


def test_a_model_assembled_after_its_optimizer_and_a_gan_second_model(out):
    layers = [nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)]
    g_opt = torch.optim.Adam(itertools.chain(*(m.parameters() for m in layers)), lr=1e-3)

    class Generator(nn.Sequential):
        pass

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))

        def forward(self, x):
            return self.body(x)

    gen = Generator(*layers)  # built after the optimizer that steps its parameters
    disc = Discriminator()
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    attach = _attach(out)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(3):
        z, real = torch.randn(8, 4), torch.randn(8, 4)
        fake = gen(z)
        d_opt.zero_grad()
        d_loss = bce(disc(real), torch.ones(8, 1)) + bce(disc(fake.detach()), torch.zeros(8, 1))
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        bce(disc(fake), torch.ones(8, 1)).backward()
        g_opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    assert run.meta["models"] == {"": "Generator", "Discriminator": "Discriminator"}
    assert run.meta["steps"] == 3  # one step = D's step and G's step
    names = _param_names(run)
    assert {
        "0.weight",
        "2.bias",
        "Discriminator.body.0.weight",
        "Discriminator.body.2.bias",
    } <= names
    grads = run.metrics.query("metric == 'grad_norm'")
    assert set(grads["layer"]) == names  # both optimizers' parameters were read


def test_tied_weights_count_once_and_name_both_places(out):
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.hidden = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.embed(ids))))

    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach = _attach(out)
    ids = torch.randint(0, 20, (4, 5))
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids).reshape(-1, 20), ids.reshape(-1)).backward()
    opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    params = [e for e in run.meta["layers"] if e["kind"] == "param"]
    tied = [e for e in params if e["name"] == "embed.weight"]
    assert len(tied) == 1 and tied[0]["aliases"] == ["head.weight"]
    assert len(params) == 3  # embed.weight (= head.weight), hidden.weight, hidden.bias


@pytest.mark.skipif(
    not compile_keeps_optimizer_hooks(),
    reason="torch 2.2's torch.compile strips optimizer step hooks (torch >= 2.3)",
)
def test_a_compiled_model_is_watched_through_the_original_without_warnings(out):
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach = _attach(out)
    x, y = _data()
    for _ in range(3):  # warnings are errors here: the OptimizedModule one must not show
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    assert run.meta["models"] == {"": "Sequential"} and run.meta["steps"] == 3
    assert _param_names(run) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_layers_added_to_a_watched_model_join_under_its_names(out):
    model = _mlp()
    attach = _attach(out)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    for step in range(4):
        if step == 2:  # the script grows the model (progressive training)
            model.append(nn.Linear(3, 3))
            opt.add_param_group({"params": model[3].parameters()})
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    assert run.meta["models"] == {"": "Sequential"}
    assert "3.weight" in _param_names(run)
    late = run.metrics.query("layer == '3.weight' and metric == 'grad_norm'")
    assert sorted(late["step"]) == [2, 3]


def test_a_model_the_script_watches_itself_is_left_to_it(out, tmp_path):
    model = _mlp()
    attach = _attach(out)
    x, y = _data()
    with gradscope.watch(model, out=tmp_path / "own", quiet=True) as own:
        nn.functional.cross_entropy(model(x), y).backward()
    assert attach.scope is None and own.steps == 1
    assert attach.close("completed", 0) == own.run_dir  # no second, empty run directory
    assert not out.exists()


def test_the_scripts_own_clip_is_seen_before_and_after(out):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    attach = _attach(out)
    x, y = _data()
    before, after = [], []
    for _ in range(3):
        opt.zero_grad()
        (100 * nn.functional.cross_entropy(model(x), y)).backward()
        before.append(
            {n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters()}
        )
        total = nn.utils.clip_grad_norm_((p for p in model.parameters()), max_norm=0.5)
        after.append(
            {n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters()}
        )
        assert float(total) > 0.5
        opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    m = run.metrics
    for step in range(3):
        rows = m[m["step"] == step]
        pre = rows[rows["metric"] == "grad_norm"].set_index("layer")["value"]
        post = rows[rows["metric"] == "grad_norm_clipped"].set_index("layer")["value"]
        for name in before[step]:
            assert pre[name] == pytest.approx(before[step][name], rel=1e-5)
            assert post[name] == pytest.approx(after[step][name], rel=1e-5)
        run_rows = rows[rows["kind"] == "run"].set_index("metric")["value"]
        total_pre = np.sqrt(sum(v**2 for v in before[step].values()))
        assert run_rows["grad_norm_total"] == pytest.approx(total_pre, rel=1e-5)
        assert run_rows["grad_norm_total_clipped"] == pytest.approx(0.5, rel=1e-4)
        assert run_rows["clip_coef"] == pytest.approx(0.5 / total_pre, rel=1e-4)
    clip_events = [e for e in run.events if e["event"] == "script_clip"]
    assert len(clip_events) == 1 and clip_events[0]["max_norm"] == 0.5


def _user_hook(module, args, output):
    return None


def test_torch_save_of_the_whole_model_holds_nothing_of_gradscope(out):
    model = _mlp()
    model[0].register_forward_hook(_user_hook)  # the user's own hook stays, in its place
    attach = _attach(out, trace_nonfinite="always")
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    order = [list(m._forward_hooks.values()) for m in model.modules()]
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"gradscope" not in buf.getvalue()
    assert [list(m._forward_hooks.values()) for m in model.modules()] == order  # restored
    twin = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert torch.equal(twin(x), model(x))
    attach.close("completed", 0)


def test_clipping_records_follow_the_optimizers_parameter_order(out):
    model = _mlp()
    # the optimizer lists the head first: per-layer records must still land on their names
    opt = torch.optim.SGD(
        [{"params": model[2].parameters()}, {"params": model[0].parameters()}], lr=0.0
    )
    x, y = _data()
    loss = 10 * nn.functional.cross_entropy(model(x), y)
    norms = [
        float(torch.linalg.vector_norm(g))
        for g in torch.autograd.grad(loss, list(model.parameters()))
    ]
    limit = sorted(norms)[1] * 1.01  # some are clipped, some are not
    with gradscope.watch(model, out=out, quiet=True, clip=f"norm:{limit},per_layer") as scope:
        opt.zero_grad()
        (10 * nn.functional.cross_entropy(model(x), y)).backward()
        expected = {
            n: min(float(torch.linalg.vector_norm(p.grad)), limit)
            for n, p in model.named_parameters()
        }
        opt.step()
        clipped = {n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters()}
    assert clipped == pytest.approx(expected, rel=1e-5)  # the clip itself
    rows = scope.load().metrics.query("metric == 'grad_norm_clipped'").set_index("layer")
    for name, value in expected.items():
        assert rows.loc[name, "value"] == pytest.approx(value, rel=1e-4), name


def test_a_model_that_moves_device_after_it_was_found_switches_host_reads(out, monkeypatch):
    import gradscope.parts as parts_mod  # where the flusher asks which device the model is on

    model = _mlp()
    attach = _attach(out)
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    scope = attach.scope
    rec = scope.parts.recorder if scope is not None else None
    assert rec is not None and rec.grads.count_policy == "host"
    # what model.to("cuda") would change: the device its first parameter reports
    monkeypatch.setattr(parts_mod, "first_device", lambda models: torch.device("cuda", 0))
    scope.flush()
    assert rec.grads.count_policy == "flagged-only"
    assert not rec.modules.count_on_host and not scope.parts.tracer.immediate
    monkeypatch.undo()
    scope.flush()
    assert rec.grads.count_policy == "host" and rec.modules.count_on_host
    attach.close("completed", 0)


def test_jit_tracing_is_not_training_and_a_traced_model_still_gets_its_gradients(out):
    model = _mlp()
    attach = _attach(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.13
        traced = torch.jit.trace(model, torch.randn(2, 6))
    assert attach.scope is None  # the tracing forward
    opt = torch.optim.SGD(traced.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(
            traced(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])
        ).backward()
        opt.step()
    run = gradscope.load_run(attach.close("completed", 0))
    assert run.meta["steps"] == 2
    assert len(run.metrics.query("metric == 'grad_norm'")) == 2 * 4


def test_modules_made_per_call_do_not_grow_the_cache_without_bound(out, monkeypatch):
    import gradscope.attach as attach_mod

    monkeypatch.setattr(attach_mod, "PRUNE_AT", 8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return nn.ReLU()(self.fc(x))  # a new, parameterless module on every call

    model = Net()
    attach = _attach(out)
    for _ in range(50):
        model(torch.randn(2, 6)).sum().backward()
    assert attach.remembered_modules <= 9
    attach.close("completed", 0)


def test_the_search_pauses_once_every_optimizer_trains_watched_models_only(out):
    """The global discovery hook sends every module call through the slow path: once every
    parameter every optimizer steps is watched it goes, and comes back for an optimizer
    that trains something else (here, a second model found after the pause)."""
    first, second = _mlp(), _mlp()
    opt1 = torch.optim.SGD(first.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(second.parameters(), lr=0.1)
    x, y = _data()
    attach = _attach(out)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        opt1.zero_grad()
        loss_fn(first(x), y).backward()
        opt1.step()
    assert not attach.discovering and attach.pauses == 1
    assert not module_globals._global_forward_pre_hooks  # no global hook left on the path
    for _ in range(4):  # a second model and its optimizer join
        opt2.zero_grad()
        loss_fn(second(x), y).backward()
        opt2.step()
        opt1.zero_grad()
        loss_fn(first(x), y).backward()
        opt1.step()
    assert not attach.discovering and attach.pauses == 2
    run = gradscope.load_run(attach.close("completed", 0))
    assert run.meta["models"] == {"": "Sequential", "Sequential": "Sequential"}
    assert _param_names(run) >= {"0.weight", "Sequential.0.weight"}
