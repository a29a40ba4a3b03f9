"""Where the first NaN/Inf came from, named at default settings on the step it happened.

Each origin is a small training run that turns non-finite at step 3 (and, with the weights then
poisoned, usually stays so): the default ``trace_nonfinite="auto"`` must name the module and the
phase on step 3 itself. On the CPU this is the replay on detection
(:mod:`gradscope.probes.replay`); the runs are plain loops with no guard, so the first NaN
reaches the weights and never recurs on clean ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope

from models import compile_keeps_optimizer_hooks

BAD = 3  # the step every origin turns non-finite


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class PairDistance(nn.Module):
    """Distance to a learned centre: sqrt at 0 when a row sits on the centre (finite forward,
    infinite derivative)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(4))

    def forward(self, x):
        return torch.sqrt(((x - self.centre) ** 2).sum(-1, keepdim=True))


class BatchStandardise(nn.Module):
    """Divides by the batch's standard deviation: 0/0 on a one-row batch."""

    def forward(self, x):
        return (x - x.mean(0)) / x.std(0, unbiased=False)


class Gain(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class NanBackward(torch.autograd.Function):
    """Identity forward; a backward that returns NaN when the input holds an exact 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (x != 0).to(grad.dtype) * (x != 0).to(grad.dtype)  # 0/0 where x == 0


class CustomFn(nn.Module):
    def forward(self, x):
        return NanBackward.apply(x)


class InPlaceLog(nn.Module):
    """log in place on its own input (a common memory-saving idiom)."""

    def forward(self, x):
        x = x.clone()
        return x.log_()


class FunctionalBetween(nn.Module):
    """A functional op in the root's own forward, between two child modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x)))


class Checkpointed(nn.Module):
    """The log(0) inside an activation-checkpointed block (recomputed in backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Identity(), Log())
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        h = checkpoint(self.block, self.fc1(x), use_reentrant=False)
        return self.fc2(h)


def _eye_linear(n_out: int = 8) -> nn.Linear:
    """Linear(4, n_out) without bias that starts as a copy of its input: a zero input row is an
    exact 0 after it, however training moved its weights."""
    lin = nn.Linear(4, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4).repeat(n_out // 4, 1))
    return lin


def _x(i: int, bad: str | None = None) -> torch.Tensor:
    x = torch.rand(8, 4) + 0.5
    if i == BAD and bad == "zero":
        x[0] = 0.0
    elif i == BAD and bad == "nan":
        x[0, 1] = float("nan")
    elif i == BAD and bad == "big":
        x[0] = 200.0
    elif i == BAD and bad == "huge":
        x[0] = 1000.0
    elif i == BAD and bad == "one_row":
        x = x[:1]
    return x


def _train(model, out, make_x, steps=6, make_y=None, lr=0.01, before_step=None, **options):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gradscope.watch(model, out=out, quiet=True, **options) as scope:
        for i in range(steps):
            x = make_x(i)
            opt.zero_grad()
            pred = model(x).float()  # the loss in float32 (a float16 model's too)
            y = make_y(i, pred) if make_y else torch.zeros_like(pred)
            nn.functional.mse_loss(pred, y).backward()
            if before_step is not None:
                before_step(i, opt)
            opt.step()
    found = [f for f in scope.findings if f["kind"] == "nonfinite"]
    assert len(found) == 1, scope.findings
    return found[0], scope


def _labels_nan(i, pred):
    y = torch.zeros_like(pred)
    if i == BAD:
        y[0] = float("nan")
    return y


def _inf_lr(i, opt):
    """The update of step BAD - 1 makes the weights infinite (finite gradients)."""
    opt.param_groups[0]["lr"] = float("inf") if i == BAD - 1 else 0.01


# name -> (model factory, input kind, options, expected phase, module, class)
ORIGINS = {
    "log of 0": (
        lambda: nn.Sequential(_eye_linear(), Log(), nn.Linear(8, 1)),
        "zero",
        {},
        "forward",
        "1",
        "Log",
    ),
    "sqrt at 0 in backward": (
        lambda: nn.Sequential(_eye_linear(4), PairDistance(), nn.Linear(1, 1)),
        "zero",
        {},
        "backward",
        "1",
        "PairDistance",
    ),
    "division by a zero batch statistic": (
        lambda: nn.Sequential(nn.Linear(4, 4), BatchStandardise(), nn.Linear(4, 1)),
        "one_row",
        {},
        "forward",
        "1",
        "BatchStandardise",
    ),
    "exp overflow": (
        lambda: nn.Sequential(_eye_linear(), Exp(), nn.Linear(8, 1)),
        "big",
        {},
        "forward",
        "1",
        "Exp",
    ),
    "a custom autograd.Function's backward": (
        lambda: nn.Sequential(_eye_linear(), CustomFn(), nn.Linear(8, 1)),
        "zero",
        {},
        "backward",
        "1",
        "CustomFn",
    ),
    "an in-place op": (
        lambda: nn.Sequential(_eye_linear(), InPlaceLog(), nn.Linear(8, 1)),
        "zero",
        {},
        "forward",
        "1",
        "InPlaceLog",
    ),
    "a functional op between two modules": (
        FunctionalBetween,
        "big_negative",
        {},
        "forward",
        "(root)",
        "FunctionalBetween",
    ),
    "inside an activation-checkpointed block": (
        Checkpointed,
        "zero_hidden",
        {},
        "forward",
        "block.1",
        "Log",
    ),
}


def _inputs(kind: str):
    if kind == "big_negative":  # fc1's outputs go negative: log < 0 = NaN
        return lambda i: -_x(i, "big") if i == BAD else _x(i)
    if kind == "zero_hidden":
        return lambda i: _x(i, "zero")
    return lambda i: _x(i, kind)


@pytest.mark.parametrize("origin", list(ORIGINS))
def test_the_module_that_made_the_first_nan_is_named_on_its_step(out, origin):
    make_model, kind, options, phase, module, cls = ORIGINS[origin]
    torch.manual_seed(0)
    model = make_model()
    if origin == "inside an activation-checkpointed block":
        model.fc1 = _eye_linear()
    if origin == "a functional op between two modules":
        model.fc1 = _eye_linear()
    f, _ = _train(model, out, _inputs(kind), **options)
    assert (f["first_step"], f["phase"], f["module"], f["class"]) == (BAD, phase, module, cls), f
    assert f["evidence"]["attributed"] in ("replayed", "traced")
    assert f"step {BAD}" in f["message"] and module in f["message"]


def test_float16_overflow_names_the_module_and_the_range(out):
    torch.manual_seed(0)
    model = nn.Sequential(_eye_linear(), Gain(100.0), nn.Linear(8, 1)).half()
    f, _ = _train(model, out, lambda i: _x(i, "huge").half(), lr=0.0)  # 1e3 x 100 > 65504
    assert (f["first_step"], f["phase"], f["module"], f["class"]) == (BAD, "forward", "1", "Gain")
    assert f["evidence"]["fp16_overflow"] is True
    assert "float16" in f["message"] and "65504" in f["message"]


def test_nan_in_the_data_is_named_as_the_data(out):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    f, _ = _train(model, out, lambda i: _x(i, "nan"))
    assert (f["first_step"], f["phase"]) == (BAD, "data")
    assert f["evidence"]["before_module"] == "0"
    assert "data" in f["message"]


def test_nan_in_the_labels_is_named_as_the_loss(out):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    f, _ = _train(model, out, lambda i: _x(i), make_y=_labels_nan)
    assert (f["first_step"], f["phase"], f["module"]) == (BAD, "loss", None)
    assert "loss" in f["message"]


def test_an_optimizer_that_makes_weights_non_finite_from_finite_gradients(out):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    f, _ = _train(model, out, lambda i: _x(i), before_step=_inf_lr)
    # the update of step BAD - 1 made the weights infinite; step BAD's forward shows it
    assert (f["phase"], f["module"]) == ("optimizer", "0")
    assert f["first_step"] == BAD
    assert f["evidence"]["nonfinite_params"]


def test_each_cause_gets_advice_that_fits_it(out):
    """An overflow is not cured by clamping before log/sqrt/division; a log at 0 is; a sqrt at 0
    in backward is named as such."""
    exp, _ = _train(
        nn.Sequential(_eye_linear(), Exp(), nn.Linear(8, 1)), out / "exp", lambda i: _x(i, "big")
    )
    assert exp["evidence"]["overflow"] is True
    assert "overflow" in exp["message"] and "range" in exp["message"]
    assert "clamp before log" not in exp["suggestion"] and "exp" in exp["suggestion"]
    log, _ = _train(
        nn.Sequential(_eye_linear(), Log(), nn.Linear(8, 1)), out / "log", lambda i: _x(i, "zero")
    )
    assert "overflow" not in log["evidence"]
    assert log["evidence"]["op"]["cause"] == "log_domain"
    assert "torch.log" in log["message"] and "clamp_min" in log["suggestion"]
    sqrt, _ = _train(
        nn.Sequential(_eye_linear(4), PairDistance(), nn.Linear(1, 1)),
        out / "sqrt",
        lambda i: _x(i, "zero"),
    )
    assert sqrt["phase"] == "backward" and "sqrt" in sqrt["suggestion"]


class _DropNormLog(nn.Module):
    """Dropout (RNG), BatchNorm (running statistics) and a log(0) at step BAD."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = _eye_linear()
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(8)
        self.log = Log()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.log(self.bn(self.drop(h)).abs() + (h == 0).to(h.dtype) * -1e9))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The exact bit pattern (NaN equals itself)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t


def _run_drop_norm(out, watched: bool):
    torch.manual_seed(0)
    model = _DropNormLog()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = gradscope.watch(model, out=out, quiet=True) if watched else None
    scope = ctx.__enter__() if ctx is not None else None
    for i in range(6):
        x = _x(i, "zero")
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.zeros(len(x), 1)).backward()
        opt.step()
    if ctx is not None:
        ctx.__exit__(None, None, None)
    state = {k: _bits(v) for k, v in model.state_dict().items()}
    moments = [_bits(v) for s in opt.state_dict()["state"].values() for v in s.values()]
    return scope, state, moments, torch.get_rng_state()


def test_a_replayed_step_leaves_the_run_bit_identical(out):
    """Weights, Adam's moments and step counts, BatchNorm's running statistics and counter,
    and the RNG state after a run whose step BAD was replayed equal those of the same run
    without gradscope, bit for bit."""
    plain = _run_drop_norm(out, watched=False)
    scope, *watched = _run_drop_norm(out, watched=True)
    f = next(f for f in scope.findings if f["kind"] == "nonfinite")
    assert (f["first_step"], f["module"], f["evidence"]["attributed"]) == (BAD, "log", "replayed")
    assert scope.parts.recorder.replay is not None and scope.parts.recorder.replay.replays == 1
    assert plain[1].keys() == watched[0].keys()
    for k in plain[1]:
        assert torch.equal(plain[1][k], watched[0][k]), k
    assert len(plain[2]) == len(watched[1])
    for a, b in zip(plain[2], watched[1]):
        assert torch.equal(a, b)
    assert torch.equal(plain[3], watched[2])


class _EveryOtherCall(nn.Module):
    """Python state that a forward changes: log(0) only on odd-numbered calls. A replay is
    call number 2k + 1 when the original was 2k: it takes the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.log(x) if self.calls % 2 == 0 else x


def test_what_a_replay_cannot_reproduce_falls_back_to_the_records(out):
    """Control flow on state the forward changes: the replay runs the other branch, names
    nothing, and the finding comes from the records (the step and phase, no module); the
    forward's side effect happens once more on the flagged step (documented)."""
    torch.manual_seed(0)
    flaky = _EveryOtherCall()
    model = nn.Sequential(_eye_linear(), flaky, nn.Linear(8, 1))
    f, scope = _train(model, out, lambda i: _x(i, "zero"))
    assert scope.parts.recorder.replay is not None and scope.parts.recorder.replay.replays >= 1
    assert f["evidence"].get("attributed") != "replayed"
    assert f["first_step"] == BAD and f["phase"] == "forward"
    assert flaky.calls == 6 + scope.parts.recorder.replay.replays  # one extra call per replay


def test_huge_finite_weights_whose_norm_overflows_are_not_non_finite(out):
    """A float32 norm of finite weights around 1e20 overflows to inf: the weights are finite,
    so nothing is non-finite (the element count decides where a norm is not finite)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e20)  # ||w|| = 4e20 > float32's 3.4e38 once squared
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out, quiet=True, update_every=1) as scope:
        for _ in range(4):
            opt.zero_grad()
            model(torch.rand(8, 4) * 1e-30).sum().backward()
            opt.step()
    run = scope.load()
    norms = run.wide("weight_norm")["0.weight"]
    assert (norms == float("inf")).all()  # the norm overflowed
    counts = run.wide("weight_nonfinite")["0.weight"]
    assert (counts == 0).all()  # the elements are finite
    assert not [f for f in scope.findings if f["kind"] == "nonfinite"], scope.findings


@pytest.mark.slow
@pytest.mark.skipif(
    not compile_keeps_optimizer_hooks(),
    reason="this torch's compile strips optimizer hooks (2.2): no pre-step flag to replay on",
)
def test_under_torch_compile_the_module_is_named_on_its_step(out):
    """The user calls the compiled wrapper, whose own hooks run eagerly: the calls are kept
    there, and the replay runs the module eagerly (outputs compared within rounding)."""
    torch.manual_seed(0)
    model = nn.Sequential(_eye_linear(), Log(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="eager")  # fast; dynamo still traces the hooks
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(compiled, out=out, quiet=True) as scope:
        for i in range(6):
            opt.zero_grad()
            pred = compiled(_x(i, "zero"))
            nn.functional.mse_loss(pred, torch.zeros_like(pred)).backward()
            opt.step()
    [f] = [f for f in scope.findings if f["kind"] == "nonfinite"]
    assert (f["first_step"], f["phase"], f["module"], f["class"]) == (BAD, "forward", "1", "Log")
    assert f["evidence"]["attributed"] == "replayed"


def _cpu_autocast_float16() -> bool:
    """CPU autocast to float16 (older torch: bfloat16 only, with a warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16


@pytest.mark.skipif(not _cpu_autocast_float16(), reason="this torch's CPU autocast: bfloat16 only")
def test_float16_overflow_under_cpu_autocast_is_replayed_under_autocast(out):
    """The replay runs under the autocast the step ran under (its state is kept with the
    call): the float16 overflow happens again, in the same module."""
    torch.manual_seed(0)
    model = nn.Sequential(_eye_linear(), Gain(100.0), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=out, quiet=True) as scope:
        for i in range(6):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                pred = model(_x(i, "huge"))
            nn.functional.mse_loss(pred.float(), torch.zeros(8, 1)).backward()
            opt.step()
    [f] = [f for f in scope.findings if f["kind"] == "nonfinite"]
    assert (f["first_step"], f["module"], f["class"]) == (BAD, "1", "Gain")
    assert f["evidence"]["attributed"] == "replayed" and f["evidence"]["fp16_overflow"] is True


def test_poisoned_weights_are_not_advised_as_an_optimizer_problem():
    """A module whose weights an earlier bad update poisoned is where the NaN shows, not where
    it was born: its advice points back to the first step, not at the learning rate."""
    from gradscope.rules.nonfinite import traced_episode

    ep = traced_episode(
        {"step": 7, "phase": "optimizer", "module": "body.0", "class": "Linear", "poisoned": True}
    )
    assert ep.evidence["traced"] is False
    assert "earlier" in ep.message and "first step" in ep.suggestion
    assert "learning rate" not in ep.suggestion and "Adam" not in ep.suggestion


class _RaisesOnReplay(nn.Module):
    """A forward that consumes an iterator of scales: run again on the replay of the last step,
    it raises (StopIteration), so the replay cannot reproduce the step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = _eye_linear()
        self.scales = iter([1.0] * BAD + [0.0])  # log(0) at step BAD, the last one

    def forward(self, x):
        return torch.log(self.fc(x) * next(self.scales))


def test_a_replay_the_users_code_refuses_names_nothing_and_stays_quiet(out, capfd):
    """The user's code raising on the replay is not an internal error of gradscope's: nothing
    is printed, the tracer stays on, and the finding comes from the records."""
    torch.manual_seed(0)
    model = _RaisesOnReplay()
    f, scope = _train(model, out, _x, steps=BAD + 1)
    replay = scope.parts.recorder.replay
    assert replay is not None and replay.failed == 1
    assert scope.parts.guard.errors == []  # not an internal error
    assert f["first_step"] == BAD and f["evidence"].get("attributed") != "replayed"
    assert "internal error" not in capfd.readouterr().err


class _ReentrantCheckpointed(Checkpointed):
    def forward(self, x):
        return self.fc2(checkpoint(self.block, self.fc1(x), use_reentrant=True))


def test_a_reentrant_checkpoint_is_traced_inside_its_block(out):
    """A reentrant checkpoint runs its block without grad in the forward pass: the replay checks
    no-grad regions too, so the module inside is named, not the model around it."""
    torch.manual_seed(0)
    model = _ReentrantCheckpointed()
    model.fc1 = _eye_linear()
    f, _ = _train(model, out, lambda i: _x(i, "zero"))
    assert (f["first_step"], f["module"], f["class"]) == (BAD, "block.1", "Log")


class MaskedAttention(nn.Module):
    """Single-head attention with a padding mask over keys: a sequence whose every key is
    padding masks a whole row with -inf, and the softmax of that row is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x, pad):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / 2.0
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MaskedAttention()
        self.head = nn.Linear(4, 1)

    def forward(self, x, pad):
        return self.head(self.attn(x, pad))


@pytest.mark.parametrize(
    ("origin", "cause", "op", "advice"),
    [
        ("masked softmax", "masked_row", "torch.softmax", "at least one position"),
        ("division by a zero std", "divide_by_zero", "Tensor.div", "epsilon"),
        ("log in the root's own forward", "log_domain", "torch.log", "clamp_min"),
    ],
)
def test_the_operation_behind_a_forward_nan_decides_the_advice(out, origin, cause, op, advice):
    """The replay watches each torch call: the finding names the operation (a functional one
    in the model's own forward too) and advice for its cause, not the generic forward advice."""
    torch.manual_seed(0)
    if origin == "masked softmax":
        model = AttnNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradscope.watch(model, out=out, quiet=True) as scope:
            for i in range(6):
                x = torch.randn(2, 5, 4)
                pad = torch.zeros(2, 5, dtype=torch.bool)
                if i == BAD:
                    pad[1] = True  # the second sequence is all padding
                opt.zero_grad()
                model(x, pad).pow(2).mean().backward()
                opt.step()
        [f] = [f for f in scope.findings if f["kind"] == "nonfinite"]
        assert (f["first_step"], f["module"]) == (BAD, "attn")
    else:
        if origin == "division by a zero std":
            model = nn.Sequential(nn.Linear(4, 4), BatchStandardise(), nn.Linear(4, 1))
            make = _inputs("one_row")
        else:
            model = FunctionalBetween()
            model.fc1 = _eye_linear()
            make = _inputs("big_negative")
        f, _ = _train(model, out, make)
    assert f["evidence"]["op"]["cause"] == cause, f
    assert f["evidence"]["op"]["op"] == op
    assert op in f["message"] and advice in f["suggestion"], f
