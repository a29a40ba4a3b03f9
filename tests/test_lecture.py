"""The lecture demo (examples/lecture_ffn.py): each of its three parts is found by gradscope and
cured by gradscope's remedy, as its docstring says (seed 0, one thread).

The example runs once per module (about 15 s: ten per-example training runs of 1,280 steps);
each test reads its part of the results and the run directories it wrote.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradscope

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location(
        "example_lecture_ffn", EXAMPLES / "lecture_ffn.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lecture = _load()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("lecture")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = lecture.main("all", out=out)
    assert torch.get_num_threads() == threads  # main() puts the thread count back
    return results, printed.getvalue(), out


def findings(r: dict[str, Any], kind: str, layer: str | None = None) -> list[dict[str, Any]]:
    return [f for f in r["findings"] if f["kind"] == kind and layer in (None, f["layer"])]


def events(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's events.jsonl, read from disk (not from the example's own summary)."""
    lines = (Path(r["run_dir"]) / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def swaps(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in events(r) if e.get("event") == "remedy" and e.get("action") == "swapped"]


@pytest.mark.parametrize("hidden", ["sigmoid", "relu", "leaky_relu"])
@pytest.mark.parametrize("output", ["sigmoid", "linear"])
def test_the_network_has_the_parameters_the_docstring_states(hidden, output):
    model = lecture.build_model(hidden, output=output)
    assert lecture.count_parameters(model) == lecture.PARAMETERS == 4 * 3 + 3 + 3 * 3 + 3 + 3 + 1
    assert f"**{lecture.PARAMETERS} parameters**" in lecture.__doc__
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [3, 3, 1]
    assert model[0].in_features == 4


def test_every_run_is_the_lectures_per_example_loop(demo):
    results, _, out = demo
    runs = [
        r
        for part in results.values()
        for key, r in part.items()
        if isinstance(r, dict) and "run_dir" in r
    ]
    assert len(runs) == 10
    for r in runs:
        run = gradscope.load_run(r["run_dir"])
        assert Path(r["run_dir"]).parent == out
        assert run.meta["status"] == "completed"
        assert run.meta["steps"] == lecture.EPOCHS * lecture.N_SAMPLES == 1280
        assert (Path(r["run_dir"]) / "report.html").is_file()


def test_vanishing_gradient_found_and_cured_by_the_relu_swap(demo):
    part = demo[0]["vanishing"]
    sick, remedy, manual = part["sick"], part["remedy"], part["manual"]
    # sick: the backward signal collapses from step 0 to the end; the first layer is frozen
    (f,) = findings(sick, "vanishing_gradients", "0")
    assert (f["first_step"], f["last_step"]) == (0, 1270)
    assert f["evidence"]["first_last_ratio"] < 1e-4
    # both hidden sigmoids: one grouped finding naming both layers
    assert {layer for g in findings(sick, "saturation") for layer in g["layers"]} == {"1", "3"}
    assert sick["first_layer_moved"] < 1e-3
    assert sick["final_loss"] > 0.09  # no better than predicting the mean (0.093)
    # remedy: both hidden sigmoids swapped to ReLU on the saturation finding
    done = swaps(remedy)
    assert {(e["layer"], e["from"], e["to"], e["finding"]) for e in done} == {
        ("1", "Sigmoid", "ReLU()", "saturation"),
        ("3", "Sigmoid", "ReLU()", "saturation"),
    }
    step = max(e["step"] for e in done)
    assert step <= 30
    model = remedy["model"]
    assert isinstance(model[1], nn.ReLU) and isinstance(model[3], nn.ReLU)
    assert isinstance(model[5], nn.Sigmoid)  # the output unit is not a hidden saturation
    # the vanishing finding ends at the swap, and nothing vanishes or saturates afterwards
    for kind in ("vanishing_gradients", "saturation"):
        assert all(g["last_step"] <= step for g in findings(remedy, kind))
    assert remedy["first_layer_moved"] > 0.1
    assert remedy["final_loss"] < 0.2 * sick["final_loss"]
    # the lecture's cure, ReLU from the start: nothing to find, the same kind of loss
    assert not findings(manual, "vanishing_gradients") and not findings(manual, "saturation")
    assert manual["final_loss"] < 0.2 * sick["final_loss"]


def test_dead_neurons_found_and_cured_by_the_leaky_relu_swap(demo):
    part = demo[0]["dead"]
    sick, remedy, manual = part["sick"], part["remedy"], part["manual"]
    (f,) = findings(sick, "dead_units", "1")
    assert f["first_step"] == 0 and f["evidence"]["born_dead"] is True
    assert f["evidence"]["dead_fraction"] == 1.0
    assert sick["units_nonpositive"] == 3 and sick["first_layer_moved"] == 0.0
    assert sick["final_loss"] > 0.09
    # remedy: 1 swapped to LeakyReLU(0.2) on the dead_units finding, which lists the action
    (e,) = swaps(remedy)
    assert (e["layer"], e["from"], e["finding"]) == ("1", "ReLU", "dead_units")
    assert e["step"] <= 50
    model = remedy["model"]
    assert isinstance(model[1], nn.LeakyReLU) and model[1].negative_slope == 0.2
    # the finding the swap acted on; what the LeakyReLU leaves never positive afterwards is
    # an info finding that says it follows from the swap
    (g,) = [f for f in findings(remedy, "dead_units", "1") if f["severity"] != "info"]
    assert [(a["remedy"], a["action"]) for a in g["remedies"]] == [("swap", "swapped")]
    assert all("swap" in f["message"] for f in findings(remedy, "dead_units") if f is not g)
    # the cure: units pass gradient again, the first layer learns, the loss falls
    assert remedy["first_layer_moved"] > 0.1
    assert remedy["units_nonpositive"] < 3
    assert remedy["final_loss"] < 0.5 * sick["final_loss"]
    assert manual["final_loss"] < 0.5 * sick["final_loss"]


def test_dead_neurons_need_the_per_example_thresholds(tmp_path):
    """Without them gradscope stays silent on a per-example loop (one example per check, and
    its dead-unit test wants 8): the reason the part passes PER_EXAMPLE_DEAD."""
    X, y = lecture.make_data()
    model = lecture.build_model("relu", hidden_bias={0: lecture.DEAD_BIAS})
    r = lecture.train(model, X, y, "dead-defaults", tmp_path, quiet=True, epochs=1)
    assert r["steps"] == 256 and r["first_layer_moved"] == 0.0  # dead all the same
    assert not findings(r, "dead_units")


def test_exploding_gradient_found_and_cured_by_fixed_and_dynamic_clipping(demo):
    part = demo[0]["exploding"]
    sick, fixed, dynamic, clean = part["sick"], part["remedy"], part["dynamic"], part["manual"]
    bad = lecture.OUTLIER_EVERY - 1  # 31: the first corrupted record, the first big gradient
    # the first corrupted record is one bad batch: a loss spike whose gradients spiked with it;
    # once such spikes recur (every 32 records) the gradients explode: an error
    spike = findings(sick, "loss_spike")[0]
    assert spike["first_step"] == bad and spike["evidence"]["gradients_spiked"] is True
    f = findings(sick, "exploding_gradients", "0.weight")[0]
    assert f["first_step"] > bad and f["severity"] == "error"
    assert f["evidence"]["peak_ratio"] > 100
    assert sick["final_loss"] > 0.09  # every ReLU off: a constant predictor
    assert not findings(clean, "exploding_gradients")
    for r, method in ((fixed, "norm:"), (dynamic, "zclip:")):
        run = gradscope.load_run(r["run_dir"])
        assert run.meta["config"]["clip"].startswith(method)
        coef = run.wide("clip_coef")["(run)"]
        assert coef[bad] < 0.1 and (coef <= 1 + 1e-6).all()
        # the per-flush "clipped" events of events.jsonl count the same steps
        clipped = [
            e for e in events(r) if e.get("event") == "remedy" and e.get("action") == "clipped"
        ]
        assert sum(e["clipped_steps"] for e in clipped) == len(r["clipped_steps"]) > 0
        # clipping does not hide the bad records (pre-clip norms), but it cures the damage
        assert findings(r, "loss_spike")[0]["first_step"] == bad
        assert r["final_loss"] < 0.25 * sick["final_loss"]
        assert r["final_loss"] < 1.5 * clean["final_loss"]


def test_the_printed_summary(demo):
    results, printed, _ = demo
    assert list(results) == ["vanishing", "dead", "exploding"]
    table = printed.split("== Summary ==")[1].splitlines()
    rows = {line.split()[0]: line for line in table[3:6]}
    assert "vanishing_gradients at 0, steps 0-1270" in rows["vanishing"]
    assert "swapped 1, 3 at step 20" in rows["vanishing"]
    assert "dead_units at 1" in rows["dead"] and "swapped 1 at step" in rows["dead"]
    assert "exploding_gradients at 0.weight" in rows["exploding"]
    for part, res in results.items():
        assert f"{res['sick']['final_loss']:.4f} -> {res['remedy']['final_loss']:.4f}" in rows[part]


def test_main_rejects_an_unknown_part(tmp_path):
    with pytest.raises(ValueError, match="part='vanish'"):
        lecture.main("vanish", out=tmp_path)
