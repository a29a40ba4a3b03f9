"""The pathology corpus (benchmarks/zoo): families build and train, labels are well formed,
the scorer computes what a hand count gives, and re-diagnosis from a kept run directory gives
the live findings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/

from benchmarks.zoo import families as fam
from benchmarks.zoo import score
from benchmarks.zoo.outcome import final_loss, rescued, train, worse
from benchmarks.zoo.run import live, parse_option, rediagnose, suggested_options


def _names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("family", [f.name for f in fam.FAMILIES])
def test_family_builds_trains_and_labels(family: str) -> None:
    f = fam.FAMILY[family]
    variants = f.variants()
    for p in (variants[0], variants[-1]):
        spec = fam.RunSpec(fam.run_id(f.name, p, f.grid), f.name, f.split, p)
        task, label = spec.make()
        assert label.kind == f.kind
        assert 0 < task.steps <= 400
        assert 0 <= label.onset < task.steps
        assert set(label.detect) | set(label.also_ok) <= set(fam.KINDS)
        if label.kind != fam.HEALTHY:
            assert label.kind in label.detect and label.layers
            names = _names(task.model)
            for layer in label.layers:
                assert layer in (fam.ANY_WEIGHT, fam.RUN) or any(
                    score.layer_ok(n, [layer]) for n in names
                ), (family, layer)
        task.steps = 2
        losses = train(task)
        assert len(losses) == 2
    if f.kind != fam.HEALTHY:
        assert f.sibling and f.rescue and f.rescue_name


def test_corpus_size_and_splits() -> None:
    runs = fam.enumerate_runs()
    assert len(runs) >= 300
    assert len({r.id for r in runs}) == len(runs)
    assert len(fam.FAMILIES) >= 12
    for split in ("calibration", "heldout"):
        kinds = {f.kind for f in fam.FAMILIES if f.split == split}
        assert set(fam.KINDS) | {fam.HEALTHY} <= kinds, split


def _run(rid: str, kind: str, findings: list[tuple], split: str = "heldout", **label) -> dict:
    lab = fam.Label(kind, **label).to_json()
    return {
        "id": rid,
        "family": rid.split("-")[0],
        "split": split,
        "label": lab,
        "findings": [
            {
                "kind": k,
                "severity": s,
                "layer": layer,
                "also_layers": also,
                "first_step": a,
                "last_step": b,
                "suggestion": "",
            }
            for k, s, layer, also, a, b in findings
        ],
    }


def test_scorer_oracle() -> None:
    runs = [
        # dead units: found at the right layer (TP), at a wrong layer with the right one in
        # also_layers (TP, lenient only), and missed (FN)
        _run(
            "d1-a",
            "dead_units",
            [("dead_units", "warning", "net.1", [], 20, 40)],
            layers=("net.1",),
        ),
        _run(
            "d2-a",
            "dead_units",
            [("dead_units", "error", "net.3", ["net.1"], 30, 40)],
            layers=("net.1",),
        ),
        _run(
            "d3-a", "dead_units", [("saturation", "warning", "net.1", [], 0, 10)], layers=("net.1",)
        ),
        # healthy: an info finding does not count; a warning is a false alarm
        _run("h1-a", "healthy", [("dead_units", "info", "net.1", [], 0, 10)]),
        _run(
            "h2-a",
            "healthy",
            [
                ("dead_units", "warning", "net.1", [], 0, 10),
                ("loss_spike", "warning", "(run)", [], 5, 5),
            ],
        ),
        # a divergence: nonfinite counts as detecting update_ratio_high; the exploding finding
        # is in the primary set, so it is no false positive
        _run(
            "v1-a",
            "update_ratio_high",
            [
                ("nonfinite", "error", "net.0", [], 12, 20),
                ("exploding_gradients", "error", "net.0.weight", [], 11, 20),
            ],
            layers=("*",),
            onset=10,
            primary=fam.DIVERGENCE,
        ),
        # a loss spike that ended before the poisoned step did not detect it
        _run(
            "s1-a",
            "loss_spike",
            [("loss_spike", "warning", "(run)", [], 3, 3)],
            layers=("(run)",),
            onset=50,
        ),
        # in another split: not counted here
        _run("x1-a", "dead_units", [], split="calibration", layers=("net.1",)),
    ]
    rep = score.report(runs, {}, [])
    sp = rep["splits"]["heldout"]
    dead = sp["kinds"]["dead_units"]
    assert (dead["planted"], dead["tp"], dead["fn"], dead["fp"]) == (3, 2, 1, 1)
    assert dead["precision"] == pytest.approx(2 / 3)
    assert dead["recall"] == pytest.approx(2 / 3)
    assert dead["f1"] == pytest.approx(2 / 3)
    assert dead["layer_acc"] == pytest.approx(0.5)
    assert dead["layer_acc_lenient"] == pytest.approx(1.0)
    assert (dead["delay_median"], dead["delay_max"]) == (25, 30)
    high = sp["kinds"]["update_ratio_high"]
    assert (high["tp"], high["fp"], high["ideal_kind_found"], high["delay_max"]) == (1, 0, 0, 1)
    assert sp["kinds"]["exploding_gradients"]["fp"] == 0
    spike = sp["kinds"]["loss_spike"]
    assert (spike["tp"], spike["fn"], spike["fp"]) == (0, 1, 1)  # h2's spike is the FP
    assert sp["healthy_runs"] == 2
    assert sp["false_alarms_per_healthy_run"] == pytest.approx(1.0)
    assert sp["healthy_runs_with_alarm"] == 1
    assert sp["confusion"]["dead_units"] == {"dead_units": 2, "saturation": 1}
    assert sp["confusion"]["healthy"] == {"nothing": 1, "dead_units": 1, "loss_spike": 1}
    assert rep["corpus"]["calibration"]["runs"] == 1
    # an unconfirmed pathological run is left out of the score
    rep2 = score.report(runs, {"d3-a": {"confirmed": False}}, [])
    assert rep2["splits"]["heldout"]["kinds"]["dead_units"]["fn"] == 0
    assert rep2["unconfirmed"] == ["d3-a"]
    misses = {(m["id"], m["type"]) for m in rep["misses"]}
    assert {("d3-a", "miss"), ("s1-a", "miss"), ("h2-a", "false_alarm")} <= misses


def test_outcome_margins_and_options() -> None:
    assert worse(float("nan"), 0.5) and worse(0.8, 0.5) and not worse(0.55, 0.5)
    assert rescued(0.6, 0.5) and not rescued(0.7, 0.5) and not rescued(float("nan"), 0.5)
    text = (
        "clip gradients: gradscope.watch(..., clip='zclip') or clip='norm:1.08e+10' (= ...); "
        "gradscope.watch(..., guard=True) skips; swap='relu->leaky_relu:0.2'; --clip autoclip"
    )
    assert suggested_options(text) == [
        "clip='zclip'",
        "clip='norm:1.08e+10'",
        "guard=True",
        "swap='relu->leaky_relu:0.2'",
        "clip='autoclip'",
    ]
    assert parse_option("guard=True") == {"guard": True}
    assert parse_option("clip='norm:2'") == {"clip": "norm:2"}
    assert score.option_group("clip='norm:1.08e+10'") == "clip='norm:X'"


def _key(findings: list[dict]) -> list[tuple]:
    return sorted(
        (f["kind"], f["severity"], f["layer"], f["first_step"], f["last_step"]) for f in findings
    )


@pytest.mark.parametrize("family", ["dead_relu_adam", "nan_log_counts"])
def test_rediagnose_equals_live(family: str, tmp_path: Path) -> None:
    first = fam.enumerate_runs(families=[family])[0]
    spec = fam.RunSpec(first.id, first.family, first.split, {**first.params, "steps": 200})
    r = live(spec, tmp_path)
    assert r["error"] is None and r["findings"]
    assert _key(rediagnose(tmp_path / spec.id)) == _key(r["findings"])
    task, _ = spec.make()
    assert final_loss(task, [1.0] * task.steps) == pytest.approx(1.0)
