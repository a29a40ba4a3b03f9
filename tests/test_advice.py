"""Advice that fits the run: options spelled for its launcher, text built from its context
(optimizer, learning rate, normalisation, remedies in force), the ``lr`` metric, and grouped
findings. Synthetic records where the answer is known by construction; small real runs for the
parts that need a model (the ``lr`` metric, the context the flusher builds)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr
from typing import Any

import numpy as np
import pytest
import torch
from test_rules import noisy, table
from torch import nn

import gradscope
from gradscope.config import Config
from gradscope.records import RUN_LAYER
from gradscope.rules.advice import OptimizerInfo, RunContext, option, render, setting
from gradscope.rules.base import LayerInfo
from gradscope.rules.engine import FINDING_KINDS, Diagnoser, finding_from
from gradscope.rules.nonfinite import DIVERGED_HINT, POISONED_HINT, phase_hint, traced_episode
from gradscope.rules.thresholds import Thresholds
from gradscope.schema import _Tally, validate_finding
from gradscope.sinks.console import FindingPrinter

Series = dict[tuple[str, str, str], tuple[Any, Any]]
OPTION_NAMES = tuple(f.name for f in Config.__dataclass_fields__.values())
SGD2 = (OptimizerInfo("SGD", 2.0, 2.0),)


def diagnose(series: Series, layers: LayerInfo, context: RunContext | None = None):
    announced: list[dict[str, Any]] = []
    d = Diagnoser(Thresholds(), lambda f, new: announced.append(dict(f)))
    d.update(table(series), layers, context=context)
    return d.findings, announced


def zoo() -> tuple[Series, LayerInfo]:
    """Records on which every rule fires: a spiking and an overflowing gradient, a backward
    signal that grows and one that shrinks with depth, dead and saturated units, update ratios
    too high and too low, a loss spike and a NaN loss."""
    n = 200
    s = np.arange(n)
    sampled = s[::10]
    info = LayerInfo()
    names = ["tanh1", "tanh2", "relu", "fc1", "fc1.weight", "fc2", "fc2.weight", "fc3.weight"]
    for i, name in enumerate(names):
        info.rank[name] = i * 1000
    info.family.update({"tanh1": "tanh", "tanh2": "tanh", "relu": "rectifier"})
    info.module_type.update({"tanh1": "Tanh", "tanh2": "Tanh", "relu": "ReLU"})
    for p in ("fc1.weight", "fc2.weight", "fc3.weight"):
        info.module_of[p] = p.split(".")[0]
        info.ndim[p] = 2
        info.module_type[p] = "Linear"
    info.module_type.update({"fc1": "Linear", "fc2": "Linear", "fc3": "Linear"})
    info.rank["fc3"] = 9000
    info.rank["fc3.weight"] = 9001
    spike = noisy(n)
    spike[100:106] *= 300
    overflow = noisy(n, seed=1)
    overflow[150] = np.inf
    loss = noisy(n, seed=2)
    loss[120] *= 1000
    loss[190] = np.nan
    depth = np.array([[10.0 ** (2 * k) for k in range(4)] for _ in sampled])  # vanishes
    series: Series = {
        ("fc1.weight", "param", "grad_norm"): (s, spike),
        ("fc2.weight", "param", "grad_norm"): (s, overflow),
        ("fc2.weight", "param", "grad_nonfinite"): (s, np.zeros(n)),
        ("fc3.weight", "param", "grad_norm"): (s, noisy(n, seed=3)),
        ("(run)", "run", "grad_norm_total"): (s, noisy(n, 2.0, seed=4)),
        ("(run)", "run", "loss"): (s, loss),
        ("tanh1", "module", "act_saturation"): (sampled, np.full(sampled.size, 0.9)),
        ("tanh2", "module", "act_saturation"): (sampled, np.full(sampled.size, 0.8)),
        ("relu", "module", "act_dead_fraction"): (sampled, np.linspace(0, 0.95, sampled.size)),
        ("fc1.weight", "param", "update_ratio"): (sampled, np.full(sampled.size, 0.5)),
        ("fc3.weight", "param", "update_ratio"): (sampled, np.full(sampled.size, 1e-7)),
    }
    for k, site in enumerate(["tanh1", "tanh2", "relu", "fc3"]):
        series[(site, "module", "output_grad_norm")] = (sampled, depth[:, k])
    return series, info


CONTEXTS = [
    RunContext(),
    RunContext(optimizers=SGD2, norms=("LayerNorm",), activations=("Tanh", "ReLU")),
    RunContext(
        optimizers=(OptimizerInfo("AdamW", 1e-3, 1e-3),),
        clip="norm:max=1,per_layer=false",
        clip_bound=1.0,
        clip_from=0,
        guard=10,
        guard_skipped=2,
        swap=("relu->leaky_relu:0.2",),
        recycle=True,
    ),
]


def _texts(context: RunContext) -> list[str]:
    series, info = zoo()
    found, _ = diagnose(series, info, context)
    kinds = {f["kind"] for f in found}
    assert kinds == set(FINDING_KINDS), kinds
    texts = [f["message"] + " | " + f["suggestion"] for f in found]
    for phase in ("forward", "backward", "loss", "data", "optimizer"):
        texts.append(render(phase_hint(phase, "m"), context))
    texts += [render(POISONED_HINT, context), render(DIVERGED_HINT, context)]
    traced = traced_episode({"step": 3, "phase": "loss", "output_max_abs": 1e20, "note": ""})
    texts.append(finding_from(traced, context)["suggestion"])
    return texts


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("launcher", ["watch", "run"])
def test_options_are_spelled_for_the_launcher_only(context, launcher):
    """Every rule's message and suggestion on records where every rule fires: under
    ``watch()`` no command-line flag, under ``gradscope run`` no ``watch(`` and no
    ``option=value`` keyword; never a marker left over."""
    ctx = RunContext(**{**context.__dict__, "launcher": launcher})
    keyword = re.compile(r"\b(" + "|".join(OPTION_NAMES) + r")=")
    for text in _texts(ctx):
        assert "\x1f" not in text and "\x1e" not in text, text
        if launcher == "watch":
            assert not re.search(r"(^|\s)--[a-z]", text), text
        else:
            assert "gradscope.watch(" not in text and not keyword.search(text), text


def test_option_and_setting_forms():
    watch, run = RunContext(), RunContext(launcher="run")
    assert render(option("clip", "zclip"), watch) == "gradscope.watch(..., clip='zclip')"
    assert render(option("clip", "zclip"), run) == "gradscope run --clip zclip ..."
    assert render(option("recycle", True), run) == "gradscope run --recycle ..."
    assert render(setting("trace_nonfinite", "always"), run) == "--trace-nonfinite always"
    assert render(option("swap", "relu->leaky_relu:0.2"), run) == (
        "gradscope run --swap 'relu->leaky_relu:0.2' ..."
    )
    on = RunContext(guard=10)
    assert render(option("guard", True), on) == "guard=True (on in this run)"


# -- advice from the context ------------------------------------------------------------------
def _dead(context: RunContext, born: bool = False):
    steps = np.arange(0, 100, 10)
    frac = np.full(steps.size, 0.95) if born else np.r_[np.zeros(3), np.full(7, 0.95)]
    info = LayerInfo(rank={"3": 0}, family={"3": "rectifier"}, module_type={"3": "ReLU"})
    found, _ = diagnose({("3", "module", "act_dead_fraction"): (steps, frac)}, info, context)
    return [f for f in found if f["kind"] == "dead_units"]


def test_dead_units_quote_the_runs_optimizer_and_lr_not_a_constant():
    (f,) = _dead(RunContext(optimizers=SGD2))
    assert "SGD at lr 2" in f["suggestion"] and "try lr 0.2-0.5" in f["suggestion"]
    assert "Adam" not in f["suggestion"] and "0.1" not in f["suggestion"]
    (g,) = _dead(RunContext())
    assert "lower the learning rate" in g["suggestion"] and " at lr " not in g["suggestion"]


def test_normalisation_is_not_suggested_to_a_model_that_has_it():
    steps = np.arange(0, 60, 10)
    info = LayerInfo(rank={"a": 0, "b": 1000, "c": 2000, "d": 3000})
    series: Series = {
        (site, "module", "output_grad_norm"): (steps, np.full(steps.size, 10.0 ** (3 - k)))
        for k, site in enumerate("abcd")  # grows 1000x from d back to a
    }
    (bare,), _ = diagnose(series, info)
    assert "add normalisation" in bare["suggestion"]
    (normed,), _ = diagnose(series, info, RunContext(norms=("LayerNorm",)))
    assert "add normalisation" not in normed["suggestion"]
    assert "LayerNorm" in normed["suggestion"]


def _low(context: RunContext, dead: bool, lr: np.ndarray | None = None):
    steps = np.arange(100, 200, 10)
    info = LayerInfo(
        rank={"fc1": 0, "fc1.weight": 1, "relu": 1000, "fc2": 2000, "fc2.weight": 2001},
        family={"relu": "rectifier"},
        module_type={"relu": "ReLU"},
        module_of={"fc1.weight": "fc1", "fc2.weight": "fc2"},
        ndim={"fc1.weight": 2, "fc2.weight": 2},
    )
    series: Series = {
        ("fc1.weight", "param", "update_ratio"): (steps, np.full(steps.size, 1e-7)),
        ("fc2.weight", "param", "update_ratio"): (steps, np.full(steps.size, 1e-7)),
        ("relu", "module", "act_dead_fraction"): (steps, np.full(steps.size, 0.97 if dead else 0)),
    }
    if lr is not None:
        series[(RUN_LAYER, "run", "lr")] = (np.arange(200), lr)
    found, _ = diagnose(series, info, context)
    return [f for f in found if f["kind"] == "update_ratio_low" and f["layer"] == "fc1.weight"]


def test_update_ratio_low_does_not_say_raise_the_lr_to_a_layer_starved_by_dead_units():
    """Dead units after a layer starve it: the dead_units finding says so, and no low-update
    finding tells the user to raise the learning rate (which kills more units)."""
    assert _low(RunContext(optimizers=SGD2), dead=True) == []
    (g,) = _low(RunContext(optimizers=(OptimizerInfo("SGD", 1e-6, 1e-6),)), dead=False)
    assert "raise the learning rate (SGD at lr 1e-06" in g["suggestion"]


def test_update_ratio_low_tells_a_decayed_schedule_from_a_learning_rate_that_fell():
    """A cosine schedule that reached 0 explains tiny updates: no finding. A learning rate
    divided by 1e5 in one step (a schedule bug) is named with the step it fell at."""
    lr = 0.1 * (1 + np.cos(np.pi * np.arange(200) / 100)) / 2  # cosine to 0 at step 100
    lr[100:] = 0.0
    assert _low(RunContext(optimizers=(OptimizerInfo("SGD", 0.0, 0.1),)), dead=False, lr=lr) == []
    fell = np.where(np.arange(200) < 60, 0.1, 1e-6)
    (f,) = _low(RunContext(optimizers=(OptimizerInfo("SGD", 1e-6, 0.1),)), dead=False, lr=fell)
    assert f["evidence"]["cause"] == "lr_drop" and "at step 60" in f["message"]
    assert "raise the learning rate" not in f["suggestion"]


# -- remedies in force ------------------------------------------------------------------------
def _exploding(context: RunContext):
    n = 120
    s = np.arange(n)
    w = noisy(n)
    w[70:76] *= 50
    total = noisy(n, 2.0, seed=5)
    total[70:76] *= 50
    series: Series = {
        ("fc.weight", "param", "grad_norm"): (s, w),
        (RUN_LAYER, "run", "grad_norm_total"): (s, total),
        (RUN_LAYER, "run", "grad_norm_total_clipped"): (s, np.minimum(total, 1.0)),
    }
    info = LayerInfo(rank={"fc.weight": 0}, module_of={"fc.weight": "fc"}, ndim={"fc.weight": 2})
    found, _ = diagnose(series, info, context)
    (f,) = [f for f in found if f["kind"] == "exploding_gradients"]
    return f


def test_an_exploding_finding_offers_a_bound_from_the_healthy_steps_only():
    """In code, not as clip=: gradscope's clipping cured 1 of 31 of the corpus' explosions
    (advice.SUGGESTED_OPTIONS); the bound is the healthy median total norm, never one taken
    from the exploding steps."""
    f = _exploding(RunContext())
    bound = float(re.search(r"max_norm=([0-9.e+-]+)", f["suggestion"]).group(1))
    assert 1 < bound < 3  # the healthy median of ~2, not of the exploding steps (~100)
    assert "zclip" not in f["suggestion"] and "clip=" not in f["suggestion"]


@pytest.mark.parametrize("launcher", ["watch", "run"])
def test_an_exploding_finding_under_clipping_says_so_and_offers_no_looser_clip(launcher):
    ctx = RunContext(
        launcher=launcher,
        optimizers=SGD2,
        clip="norm:max=100,per_layer=false",
        clip_bound=100.0,
        clip_from=0,
    )
    f = _exploding(ctx)
    ev = f["evidence"]
    assert ev["clip"] == ctx.clip and ev["clipped_since"] == 0
    assert ev["post_clip_norm_max"] == 1.0
    assert "clipped" in f["message"] and "since step 0" in f["message"]
    assert "zclip" not in f["suggestion"]
    bounds = [float(b) for b in re.findall(r"norm:([0-9.e+-]+)", f["suggestion"])]
    assert bounds == [10.0] or bounds == [] or all(b < 100 for b in bounds)
    tight = _exploding(RunContext(**{**ctx.__dict__, "clip_bound": 1.0, "clip": "norm:max=1"}))
    assert not re.findall(r"norm:(?!max=1\b)", tight["suggestion"])  # only the one applied


def test_a_nonfinite_finding_under_guard_says_how_many_steps_were_skipped():
    s = np.arange(30)
    loss = noisy(30)
    loss[20:] = np.nan
    series: Series = {(RUN_LAYER, "run", "loss"): (s, loss)}
    found, announced = diagnose(series, LayerInfo(), RunContext(guard=10, guard_skipped=7))
    (f,) = found
    assert "skipped 7 optimizer step(s)" in f["message"]
    assert f["evidence"]["skipped_by_guard"] == 7
    assert "guard=True (on in this run)" in f["suggestion"]
    assert announced[0]["message"] == f["message"]


def test_dead_units_after_a_swap_follow_from_it_as_info():
    steps = np.arange(0, 200, 10)
    frac = np.r_[np.zeros(3), np.full(17, 0.95)]
    info = LayerInfo(rank={"3": 0}, family={"3": "rectifier"}, module_type={"3": "ReLU"})
    swapped = LayerInfo(info.rank, info.family, {"3": "LeakyReLU"})
    ctx = RunContext(swap=("relu->leaky_relu:0.2",), swapped={"3": (80, "ReLU", "LeakyReLU")})
    d = Diagnoser(Thresholds(), lambda f, new: None)
    d.update(table({("3", "module", "act_dead_fraction"): (steps[:9], frac[:9])}), info)
    dead = table({("3", "module", "act_dead_fraction"): (steps[9:], frac[9:])})
    d.update(dead, swapped, None, ctx)
    before, after = d.findings
    assert before["severity"] == "error" and before["last_step"] <= 80
    assert after["severity"] == "info" and after["first_step"] > 80
    assert "follows from the swap" in after["message"]


def test_a_swap_is_told_on_the_terminal():
    printer = FindingPrinter()
    finding = {"kind": "dead_units", "layer": "3"}
    action = {"action": "swapped", "step": 40, "layer": "3", "from": "ReLU", "to": "LeakyReLU"}
    err = io.StringIO()
    with redirect_stderr(err):
        printer.remedy(finding, action)
    assert "swapped 3 at step 40 (ReLU -> LeakyReLU)" in err.getvalue()


# -- grouping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 6])
def test_saturated_layers_are_one_finding_and_one_line(n):
    steps = np.arange(0, 60, 10)
    sites = [f"t{i}" for i in range(n)]
    info = LayerInfo(
        rank={**{s: 1000 * i for i, s in enumerate(sites)}, "out": 10**6, "out.weight": 10**6},
        family=dict.fromkeys(sites, "tanh"),
        module_type=dict.fromkeys(sites, "Tanh"),
        module_of={"out.weight": "out"},
    )
    series: Series = {
        (s, "module", "act_saturation"): (steps, np.full(steps.size, 0.9 - 0.01 * i))
        for i, s in enumerate(reversed(sites))  # the last site strongest: forward order wins
    }
    printer = FindingPrinter()
    d = Diagnoser(Thresholds(), printer.announce)
    err = io.StringIO()
    with redirect_stderr(err):
        d.update(table(series), info)
    (f,) = d.findings
    assert f["layer"] == "t0" and f["layers"] == sites
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and f"{n} layers: t0, t1" in lines[0]


def test_grouped_findings_with_other_causes_stay_apart():
    steps = np.arange(0, 60, 10)
    info = LayerInfo(
        rank={"s": 0, "t": 1000, "out": 10**6},
        family={"s": "sigmoid", "t": "tanh"},
        module_type={"s": "Sigmoid", "t": "Tanh"},
        module_of={"out.weight": "out"},
    )
    series: Series = {
        (s, "module", "act_saturation"): (steps, np.full(steps.size, 0.9)) for s in ("s", "t")
    }
    found, _ = diagnose(series, info)
    assert [f["layers"] for f in found] == [["s"], ["t"]]


def test_findings_without_layers_still_load():
    old = {
        "kind": "saturation",
        "severity": "warning",
        "layer": "t0",
        "first_step": 0,
        "last_step": 5,
        "evidence": {},
        "message": "m",
        "suggestion": "s",
    }
    problems: list[str] = []
    got = validate_finding(old, "findings.json[0]", _Tally(problems, "findings.json"))
    assert got == old and problems == []
    bad = validate_finding({**old, "layers": "t0"}, "x", _Tally(problems, "findings.json"))
    assert bad is not None and "layers" not in bad and problems
    grouped = validate_finding({**old, "layers": ["t1"]}, "x", _Tally(problems, "f"))
    assert grouped is not None and grouped["layers"] == ["t0", "t1"]


# -- the lr metric and the context of a real run ----------------------------------------------
def _train(out, scheduler, steps: int = 12, **options: Any):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = scheduler(opt)
    seen = []
    scope = gradscope.watch(model, out=out, quiet=True, tensorboard=False, **options)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    run = scope.load()
    context = scope.parts.flusher.context()
    scope.close()
    return run, seen, context


def test_the_lr_metric_is_the_optimizers_lr_at_each_step(out):
    run, seen, context = _train(out, lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5))
    assert run.wide("lr")[RUN_LAYER].tolist() == seen
    assert context.optimizers[0].name == "SGD" and context.optimizers[0].initial_lr == 0.5
    assert context.norms == ("LayerNorm",) and "ReLU" in context.activations
    assert context.launcher == "watch" and context.clip is None


def test_a_cosine_schedule_to_zero_is_visible_in_lr(out):
    def cosine(o):
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)

    run, seen, _ = _train(out, cosine, steps=11)
    lr = run.wide("lr")[RUN_LAYER].to_numpy()
    assert lr.tolist() == seen and lr[0] == 0.5 and lr[10] < 1e-12
    assert (np.diff(lr[:11]) <= 0).all()


def test_the_context_knows_the_clip_in_force_and_from_when(out):
    _, _, context = _train(
        out, lambda o: torch.optim.lr_scheduler.StepLR(o, 100), steps=4, clip="norm:1.0"
    )
    assert context.clip is not None and context.clip.startswith("norm:")
    assert context.clip_bound == 1.0 and context.clip_from == 0
