"""The remedies cure the examples they are meant for (seed 0, one thread).

Each example runs three ways: untreated, treated (a remedy option on ``watch``), and, where
there is one, a healthy counterfactual (the same script without its fault). The remedy must
bring the run to the healthy outcome; the untreated run must not get there (so the test can
tell the difference). Figures for seeds 0-2 are in examples/README.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradscope

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(
    name: str, out: Path, patch: dict[str, Any] | None = None, **options: Any
) -> tuple[gradscope.Scope, dict[str, Any], torch.nn.Module]:
    spec = importlib.util.spec_from_file_location(f"cure_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in (patch or {}).items():
        setattr(module, key, value)
    box: dict[str, Any] = {}
    build = module.build_model

    def watched_build():
        model = build()
        box["model"] = model
        box["scope"] = gradscope.watch(model, out=out, quiet=True, tensorboard=False, **options)
        return model

    module.build_model = watched_build
    truth: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            truth = module.main()
    finally:
        if "scope" in box:
            box["scope"].close()
    return box["scope"], truth, box["model"]


def final_loss(scope: gradscope.Scope) -> float:
    loss = scope.load().wide("loss")["(run)"]
    return float(np.median(loss.iloc[-10:]))


def max_loss(scope: gradscope.Scope) -> float:
    return float(scope.load().wide("loss")["(run)"].max())


@pytest.mark.parametrize("clip", ["norm:1.0", "autoclip", "zclip", "agc:0.01"])
def test_clipping_cures_the_poisoned_batch(out, clip):
    healthy = final_loss(run("poisoned_batch", out, patch={"POISON_STEP": 10**9})[0])
    untreated = final_loss(run("poisoned_batch", out)[0])
    treated = final_loss(run("poisoned_batch", out, clip=clip)[0])
    assert untreated > 1.5 * healthy  # the bad batch wrecks the rest of the run (Adam's v)
    assert treated <= 1.1 * healthy, (treated, healthy)


@pytest.mark.parametrize("clip", ["norm:1.0", "autoclip", "zclip"])
def test_clipping_cures_the_exploding_rnn(out, clip):
    """There is no spike-free version of this run (the cliff is where training must go), so
    'healthy' is the run's own start: a cured run never climbs back above its first loss, and
    ends far below the untreated one."""
    untreated = run("exploding_rnn", out)[0]
    treated = run("exploding_rnn", out, clip=clip)[0]
    start = float(treated.load().wide("loss")["(run)"].iloc[0])
    assert max_loss(untreated) > 2 * start  # the spikes
    assert max_loss(treated) <= 1.15 * start, (max_loss(treated), start)
    assert final_loss(treated) < 0.5 * final_loss(untreated)
    coef = treated.load().wide("clip_coef")["(run)"]
    assert (coef < 1).any() and (coef <= 1 + 1e-6).all()


def test_swap_cures_the_dying_relu(out):
    untreated, truth, _ = run("dying_relu", out)
    # slope 0.2 (DCGAN's LeakyReLU): against Adam at lr 0.1, 0.1 left 13% and 0.01 75% of
    # the units negative on every example (seed 0, one thread)
    treated, truth_t, model = run("dying_relu", out, swap="relu->leaky_relu:0.2")
    assert truth["dead_3_end"] > 0.5
    assert isinstance(model[3], torch.nn.LeakyReLU)
    # dead = pre-activation <= 0 for every example: the example's own replay at the end, and
    # gradscope's record at its last sample (step 90)
    assert truth_t["dead_3_end"] < 0.10
    recorded = treated.load().wide("act_dead_fraction")["3"]
    assert recorded.max() > 0.5 and recorded.iloc[-1] < 0.10
    assert final_loss(treated) < final_loss(untreated)
    swap = next(f for f in treated.findings if f["kind"] == "dead_units")["remedies"][0]
    assert swap["action"] == "swapped" and swap["step"] <= 40


def test_a_gentle_swap_still_lowers_the_loss(out):
    """PyTorch's default slope 0.01: the units stay mostly negative under Adam at lr 0.1, but
    they pass gradient, and the run ends at a lower loss (seeds 0-2: 0.30/0.41/0.13 vs
    0.91/0.66/0.98)."""
    untreated = run("dying_relu", out)[0]
    treated = run("dying_relu", out, swap="relu->leaky_relu:0.01")[0]
    assert final_loss(treated) < 0.7 * final_loss(untreated)


def test_guard_keeps_the_nan_example_finite(out):
    with pytest.raises(gradscope.NonfiniteStepsError):
        run("nan_log_forward", out, guard=True)
    # allowed to skip for ever: the run finishes, the weights never saw a NaN update
    scope, _, model = run("nan_log_forward", out, guard=10**6)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run_ = scope.load()
    skipped = run_.wide("guard_skipped")
    assert skipped.index.min() == 33  # the first NaN step of seed 0 (example docstring)
    assert len(skipped) > 10
    events = [
        json.loads(line) for line in (scope.run_dir / "events.jsonl").read_text().splitlines()
    ]
    assert sum(e.get("action") == "skip_step" for e in events) == len(skipped)
    # and because the weights stayed clean, the NaN came back at the next step where the
    # tracer (armed by the first one) named its origin; untreated, the NaN weights hide it
    (finding,) = scope.findings
    assert (finding["kind"], finding["module"], finding["phase"]) == (
        "nonfinite",
        "log_probs",
        "forward",
    )
    assert finding["evidence"]["traced"] is True


def test_early_diagnosis_for_swap_loses_no_finding(out):
    """With swap= on, only the unit rules run at every sample; the others still see every
    step at the next flush: the same findings, at the same steps, as without it."""
    plain = run("poisoned_batch", out)[0]
    swapped = run("poisoned_batch", out, swap="relu->gelu", recycle=True)[0]

    def shape(scope):
        return sorted((f["kind"], f["layer"], f["first_step"]) for f in scope.findings)

    assert shape(swapped) == shape(plain)
    assert ("loss_spike", "(run)", 120) in shape(plain)
