"""Rules on synthetic records: no model, hand-made series with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from gradscope.records import RUN_LAYER, LongTable
from gradscope.rules.base import Episode, LayerInfo, trailing_stats
from gradscope.rules.engine import Diagnoser
from gradscope.rules.nonfinite import traced_episode
from gradscope.rules.thresholds import Thresholds

Series = dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]


def table(series: Series) -> LongTable:
    columns = list(series)
    steps, cols, values = [], [], []
    for i, key in enumerate(columns):
        s, v = series[key]
        steps.append(np.asarray(s, dtype=np.int64))
        cols.append(np.full(len(s), i, dtype=np.int64))
        values.append(np.asarray(v, dtype=float))
    return LongTable(np.concatenate(steps), np.concatenate(cols), np.concatenate(values), columns)


def info(params=(), sites=(), families=None, ndim=None) -> LayerInfo:
    li = LayerInfo()
    for i, name in enumerate([*sites, *params]):
        li.rank[name] = i
    for name in params:
        li.module_of[name] = name.rsplit(".", 1)[0]
        li.ndim[name] = (ndim or {}).get(name, 2)
        li.module_type[name] = "Linear"
    for name in sites:
        li.family[name] = (families or {}).get(name)
        li.module_type[name] = {
            "rectifier": "ReLU",
            "sigmoid": "Sigmoid",
            "tanh": "Tanh",
            "softmax": "Softmax",
        }.get(li.family[name] or "", "Linear")
    return li


def diagnose(series: Series, layers: LayerInfo, chunks: int = 1, **thresholds):
    announced = []
    d = Diagnoser(Thresholds(**thresholds), lambda f, new: announced.append((f["kind"], new)))
    t = table(series)
    if chunks == 1:
        d.update(t, layers)
    else:  # flush in pieces, as a run does
        edges = np.linspace(t.step.min(), t.step.max() + 1, chunks + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            keep = (t.step >= a) & (t.step < b)
            d.update(LongTable(t.step[keep], t.col[keep], t.value[keep], t.columns), layers)
    return d.findings, announced


def noisy(n: int, level: float = 1.0, seed: int = 0, spread: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return level * np.exp(rng.normal(0, spread, n))


def grads(values_by_layer: dict[str, np.ndarray]) -> Series:
    return {
        (name, "param", "grad_norm"): (np.arange(len(v)), v) for name, v in values_by_layer.items()
    }


# -- exploding gradients --------------------------------------------------------------------------
def test_sustained_spike_is_one_exploding_finding_at_the_layer():
    w = noisy(120)
    w[70:76] *= 50
    found, announced = diagnose(
        grads({"rnn.weight_hh": w, "fc.weight": noisy(120, seed=1)}),
        info(params=("rnn.weight_hh", "fc.weight")),
        chunks=4,
    )
    assert [(f["kind"], f["layer"], f["first_step"], f["last_step"]) for f in found] == [
        ("exploding_gradients", "rnn.weight_hh", 70, 75)
    ]
    assert announced == [("exploding_gradients", True)]
    assert found[0]["evidence"]["peak_ratio"] == pytest.approx(50, rel=0.5)


def test_an_extended_finding_keeps_the_numbers_of_its_worst_peak():
    w = noisy(200)
    w[70:76] *= 50
    w[120:123] *= 20  # a second, smaller cluster within merge_gap: extends the finding
    found, announced = diagnose(grads({"a.weight": w}), info(params=("a.weight",)), chunks=4)
    assert len(found) == 1 and len(announced) == 1
    f = found[0]
    assert (f["first_step"], f["last_step"]) == (70, 122)
    ev = f["evidence"]
    assert 70 <= ev["peak_step"] <= 75 and ev["peak_ratio"] > 30
    assert ev["peak_norm"] == pytest.approx(ev["peak_ratio"] * ev["median_norm"], rel=1e-6)


def test_an_early_blow_up_is_caught_before_the_full_history():
    w = noisy(40)
    w[8:] *= np.geomspace(10, 1e8, 32)  # from step 8 on, 10x and growing 1.7x a step
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)))
    assert [f["kind"] for f in found] == ["exploding_gradients"]
    assert 8 <= found[0]["first_step"] <= 15  # once 100x above the median of what came before
    calm = noisy(40)
    calm[8] *= 20  # one 20x step early on: not enough history for a verdict below 100x
    assert diagnose(grads({"a.weight": calm}), info(params=("a.weight",)))[0] == []


def test_short_moderate_spike_waits_for_patience_but_a_huge_one_does_not():
    w = noisy(100)
    w[50] *= 30  # one step, 30x: below spike_once_ratio, shorter than patience
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)))
    assert found == []
    w[80] *= 1000
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)))
    assert [(f["kind"], f["first_step"], f["severity"]) for f in found] == [
        ("exploding_gradients", 80, "error")
    ]


def test_a_larger_later_spike_takes_over_the_message_with_its_evidence():
    w = noisy(200)
    w[60] *= 150
    w[120] *= 3000
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)), chunks=2)
    [f] = found
    assert (f["first_step"], f["last_step"]) == (60, 120)
    assert f["evidence"]["peak_step"] == 120
    assert "at step 120" in f["message"] and "at step 60" not in f["message"]


def test_all_layers_spiking_together_make_one_finding_naming_the_others():
    layers = {f"l{i}.weight": noisy(100, seed=i) for i in range(4)}
    for i, v in enumerate(layers.values()):
        v[60] *= 200 * (i + 1)
    found, _ = diagnose(grads(layers), info(params=tuple(layers)))
    assert len(found) == 1 and found[0]["layer"] == "l3.weight"
    # grouped: the strongest names the finding, every layer is in `layers` (strongest first)
    assert found[0]["layers"] == ["l3.weight", "l2.weight", "l1.weight", "l0.weight"]


def test_a_nan_step_does_not_poison_the_history():
    w = noisy(150)
    w[40] = np.nan
    w[41] = np.inf
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)), chunks=3)
    assert not [f for f in found if f["kind"] == "exploding_gradients"]


def test_slow_growth_is_not_a_spike():
    w = np.geomspace(1e-3, 1.0, 300) * noisy(300)  # 1000x over 300 steps: a trend, not a jump
    found, _ = diagnose(grads({"a.weight": w}), info(params=("a.weight",)), chunks=3)
    assert found == []


def test_overflowing_norm_of_finite_elements_is_exploding():
    s = np.arange(30)
    norm = np.ones(30)
    norm[20] = np.inf
    count = np.zeros(30)
    norm[21:23] = np.inf  # a.weight overflows at steps 20-22, b.weight from step 22
    late = np.ones(30)
    late[22] = np.inf
    found, _ = diagnose(
        {
            ("a.weight", "param", "grad_norm"): (s, norm),
            ("a.weight", "param", "grad_nonfinite"): (s, count),
            ("b.weight", "param", "grad_norm"): (s, late),
            ("b.weight", "param", "grad_nonfinite"): (s, count),
        },
        info(params=("a.weight", "b.weight")),
    )
    assert [(f["kind"], f["severity"], f["layer"], f["first_step"]) for f in found] == [
        ("exploding_gradients", "error", "a.weight", 20)
    ]  # one finding for both layers
    assert found[0]["layers"] == ["a.weight", "b.weight"]


# -- depth: backward signal ---------------------------------------------------------------------
def _signal(factor: float, sites: int = 6, steps: int = 8) -> Series:
    out: Series = {}
    s = np.arange(0, steps * 10, 10)
    for i in range(sites):
        signal = np.full(s.size, factor ** (sites - i))
        out[(f"layer{i}", "module", "output_grad_norm")] = (s, signal)
    return out


def test_backward_signal_shrinking_with_depth_is_vanishing_at_the_first_layer():
    names = tuple(f"layer{i}" for i in range(6))
    found, _ = diagnose(_signal(0.1), info(sites=names))  # 0.1^5 = 1e-5 from last to first
    assert [(f["kind"], f["layer"]) for f in found] == [("vanishing_gradients", "layer0")]
    assert found[0]["evidence"]["per_layer_factor"] == pytest.approx(0.1, rel=1e-6)
    assert found[0]["evidence"]["first_last_ratio"] == pytest.approx(0.1**5, rel=1e-6)


def test_backward_signal_growing_with_depth_is_exploding():
    names = tuple(f"layer{i}" for i in range(6))
    found, _ = diagnose(_signal(3.0), info(sites=names))  # 3^5 = 243
    assert [(f["kind"], f["layer"]) for f in found] == [("exploding_gradients", "layer0")]


def test_mild_depth_profile_is_healthy():
    names = tuple(f"layer{i}" for i in range(6))
    assert diagnose(_signal(0.3), info(sites=names))[0] == []  # 0.3^5 = 2.4e-3
    assert diagnose(_signal(2.5), info(sites=names))[0] == []  # 2.5^5 = 98


def test_the_root_and_other_containers_are_not_depth_points():
    """A root module with a parameter of its own starts first but outputs last: left out of
    the depth fit, it cannot be named the first layer (it was "(root)" on a post-LN model)."""
    names = tuple(f"layer{i}" for i in range(6))
    series = _signal(0.1)
    s = series[("layer0", "module", "output_grad_norm")][0]
    series[("(root)", "module", "output_grad_norm")] = (s, np.full(s.size, 1.0))
    li = info(sites=("(root)", *names))
    li.containers.add("(root)")
    found, _ = diagnose(series, li)
    assert [(f["kind"], f["layer"]) for f in found] == [("vanishing_gradients", "layer0")]


def test_one_spike_that_sets_the_loss_back_is_exploding_without_patience():
    n = 200
    w = noisy(n)
    w[150] *= 16
    loss = noisy(n, level=1.0, spread=0.02, seed=3)
    loss[151:] *= 2.0  # the step undid training
    series = {**grads({"rnn.weight_hh": w}), (RUN_LAYER, "run", "loss"): (np.arange(n), loss)}
    found, _ = diagnose(series, info(params=("rnn.weight_hh",)), chunks=4)
    assert [(f["kind"], f["first_step"]) for f in found] == [("exploding_gradients", 150)]
    calm = {**series, (RUN_LAYER, "run", "loss"): (np.arange(n), noisy(n, spread=0.02, seed=3))}
    assert diagnose(calm, info(params=("rnn.weight_hh",)), chunks=4)[0] == []


def test_dead_units_are_not_called_vanishing():
    names = tuple(f"layer{i}" for i in range(6))
    series = _signal(0.1)
    s = series[("layer0", "module", "output_grad_norm")][0]
    series[("layer2", "module", "act_dead_fraction")] = (s, np.full(s.size, 0.95))
    found, _ = diagnose(series, info(sites=names, families={"layer2": "rectifier"}))
    assert [f["kind"] for f in found] == ["dead_units"]


# -- dead units and saturation --------------------------------------------------------------------
def _site(name: str, metric: str, values, every: int = 10, n: float = 640.0, units: float = 10):
    s = np.arange(0, len(values) * every, every)
    return {
        (name, "module", metric): (s, np.asarray(values, dtype=float)),
        (name, "module", "_n"): (s, np.full(len(values), n)),
        (name, "module", "_units"): (s, np.full(len(values), units)),
    }


def test_born_dead_and_died_in_training_are_told_apart():
    series = {
        **_site("net.1", "act_dead_fraction", [0.7] * 10),
        **_site("net.3", "act_dead_fraction", [0.0] * 5 + [0.8] * 5),
    }
    found, _ = diagnose(
        series,
        info(sites=("net.1", "net.3"), families={"net.1": "rectifier", "net.3": "rectifier"}),
    )
    by_layer = {f["layer"]: f for f in found}
    assert set(by_layer) == {"net.1", "net.3"}
    assert by_layer["net.1"]["evidence"]["born_dead"] is True
    assert by_layer["net.1"]["first_step"] == 0 and "from the start" in by_layer["net.1"]["message"]
    assert by_layer["net.3"]["evidence"]["born_dead"] is False
    assert by_layer["net.3"]["first_step"] == 50 and "LeakyReLU" in by_layer["net.3"]["suggestion"]


def test_dead_needs_patience_enough_examples_and_a_rectifier():
    fam = {"a": "rectifier", "b": "rectifier", "c": "sigmoid"}
    series = {
        **_site("a", "act_dead_fraction", [0, 0, 0.9, 0.9, 0, 0]),  # 2 checks < patience
        **_site("b", "act_dead_fraction", [0.9] * 6, n=40.0),  # 4 examples per unit
        **_site("c", "act_dead_fraction", [0.9] * 6),
    }
    assert diagnose(series, info(sites=("a", "b", "c"), families=fam))[0] == []


def test_saturated_tanh_is_found_but_peaked_softmax_is_not():
    fam = {"t": "tanh", "s": "softmax"}
    series = {**_site("t", "act_saturation", [0.9] * 6), **_site("s", "act_saturation", [0.99] * 6)}
    found, _ = diagnose(series, info(sites=("t", "s"), families=fam))
    assert [(f["kind"], f["layer"]) for f in found] == [("saturation", "t")]


def test_an_output_sigmoid_may_saturate():
    fam = {"net.1": "sigmoid", "net.3": "sigmoid"}
    li = info(params=("net.0.weight", "net.2.weight"), sites=("net.1", "net.3"), families=fam)
    li.rank.update({"net.0": 0, "net.1": 1, "net.2": 2, "net.3": 3})
    series = {
        **_site("net.1", "act_saturation", [0.9] * 6),
        **_site("net.3", "act_saturation", [0.99] * 6),
    }
    found, _ = diagnose(series, li)
    assert [(f["kind"], f["layer"]) for f in found] == [("saturation", "net.1")]


def test_a_leaky_unit_that_is_never_positive_is_not_called_gradient_free():
    """LeakyReLU & co. still pass a small gradient below 0: the finding says so, stays a
    warning, and does not suggest swapping to the LeakyReLU it already is."""
    li = info(sites=("act",), families={"act": "rectifier"})
    li.module_type["act"] = "LeakyReLU"
    found, _ = diagnose(_site("act", "act_dead_fraction", [0.95] * 6), li)
    [f] = found
    assert f["kind"] == "dead_units" and f["severity"] == "warning"
    assert "never positive" in f["message"] and "output 0" not in f["message"]
    assert "leaky" not in f["suggestion"].lower()


# -- update ratios --------------------------------------------------------------------------------
def test_update_ratio_high_after_warmup_only_on_weights():
    s = np.arange(0, 200, 10)
    high = np.full(s.size, 0.5)
    series = {
        ("w.weight", "param", "update_ratio"): (s, high),
        ("w.bias", "param", "update_ratio"): (s, high),
        ("early.weight", "param", "update_ratio"): (s, np.where(s < 50, 0.5, 1e-3)),
        ("calm.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
        ("still.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
        ("quiet.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
    }
    params = ("w.weight", "w.bias", "early.weight", "calm.weight", "still.weight", "quiet.weight")
    found, _ = diagnose(series, info(params=params, ndim={"w.bias": 1}))
    assert [(f["kind"], f["layer"], f["first_step"]) for f in found] == [
        ("update_ratio_high", "w.weight", 50)
    ]


def test_updates_broadly_too_high_at_the_start_are_raised_at_once():
    """Most weight matrices moving by more than their size on the first check is the learning
    rate (the corpus' too-high learning rates: 1.4 and more; healthy runs at most 0.4), even
    inside the warm-up window and on one check; one matrix alone during warm-up is not."""
    s = np.arange(0, 100, 10)
    early = np.where(s == 0, 1.5, 2e-3)
    series = {(f"l{i}.weight", "param", "update_ratio"): (s, early) for i in range(3)}
    found, _ = diagnose(series, info(params=tuple(f"l{i}.weight" for i in range(3))))
    assert [(f["kind"], f["first_step"], f["last_step"]) for f in found] == [
        ("update_ratio_high", 0, 0)
    ]
    assert found[0]["layers"] == ["l0.weight", "l1.weight", "l2.weight"]
    lone = {
        **series,
        **{(f"l{i}.weight", "param", "update_ratio"): (s, s * 0 + 2e-3) for i in (1, 2)},
    }
    assert diagnose(lone, info(params=tuple(f"l{i}.weight" for i in range(3))))[0] == []


def test_high_updates_just_before_a_divergence_count_on_one_check():
    s = np.arange(0, 100)
    ratio = np.where(s == 60, 0.4, 1e-3)
    loss = np.where(s < 60, 1.0, np.where(s < 75, 1.3 ** (s - 59.0), np.inf))  # climbs, then NaN
    series = {
        ("w.weight", "param", "update_ratio"): (s[::10], ratio[::10]),
        ("(run)", "run", "loss"): (s, loss),
    }
    found, _ = diagnose(series, info(params=("w.weight",)))
    assert ("update_ratio_high", "w.weight", 60) in [
        (f["kind"], f["layer"], f["first_step"]) for f in found
    ]
    # a healthy loss that turns NaN at once (a sqrt at 0) is an accident, not a divergence: the
    # update before it is judged with the usual patience
    accident = {**series, ("(run)", "run", "loss"): (s, np.where(s < 75, 1.0, np.inf))}
    assert "update_ratio_high" not in [
        f["kind"] for f in diagnose(accident, info(params=("w.weight",)))[0]
    ]


def test_huge_updates_count_even_during_warmup():
    s = np.arange(0, 100, 10)
    series = {
        ("w.weight", "param", "update_ratio"): (s, np.where(s < 40, 5.0, 1e-3)),
        ("v.weight", "param", "update_ratio"): (s, np.where(s < 40, 0.5, 1e-3)),
    }
    found, _ = diagnose(series, info(params=("w.weight", "v.weight")))
    assert [(f["kind"], f["layer"], f["first_step"], f["last_step"]) for f in found] == [
        ("update_ratio_high", "w.weight", 0, 30)
    ]


def test_tiny_updates_of_a_run_that_learnt_or_whose_schedule_ended_are_not_low():
    s = np.arange(0, 400, 10)
    every = np.arange(400)
    tiny = {("w.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-7))}
    flat = {(RUN_LAYER, "run", "loss"): (every, np.full(400, 2.3))}
    fell = {(RUN_LAYER, "run", "loss"): (every, np.linspace(2.3, 0.2, 400))}
    li = info(params=("w.weight",))
    assert [f["kind"] for f in diagnose({**tiny, **flat}, li)[0]] == ["update_ratio_low"]
    assert diagnose({**tiny, **fell}, li)[0] == []  # converged: moving little is fine
    decayed = {(RUN_LAYER, "run", "lr"): (every, 1e-3 * np.cos(every / 400 * np.pi / 2) ** 8)}
    [f] = diagnose({**tiny, **flat, **decayed}, li)[0]
    # raised while the lr was near its peak; once below a tenth of it (step 184), the schedule
    # explains the tiny updates and the finding is not extended
    assert f["kind"] == "update_ratio_low" and f["last_step"] < 184
    # a learning rate that falls 1e5x in one step (a schedule bug) is no schedule: the tiny
    # updates after it are a finding, though the loss fell before the drop
    bug = {(RUN_LAYER, "run", "lr"): (every, np.where(every < 100, 1e-3, 1e-8))}
    after = {("w.weight", "param", "update_ratio"): (s, np.where(s < 100, 1e-3, 1e-8))}
    [f] = diagnose({**after, **fell, **bug}, li)[0]
    assert (f["kind"], f["first_step"]) == ("update_ratio_low", 100)
    dead = {("act", "module", "act_dead_fraction"): (s, np.full(s.size, 0.9))}
    li_dead = info(params=("w.weight",), sites=("act",), families={"act": "rectifier"})
    kinds = [f["kind"] for f in diagnose({**tiny, **flat, **dead}, li_dead)[0]]
    assert kinds == ["dead_units"]  # the dead units starve it: one finding, theirs


def test_update_ratio_low_ignores_exact_zeros():
    s = np.arange(0, 200, 10)
    series = {
        ("a.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-8)),
        ("b.weight", "param", "update_ratio"): (s, np.zeros(s.size)),  # frozen
    }
    found, _ = diagnose(series, info(params=("a.weight", "b.weight")))
    assert [(f["kind"], f["layer"]) for f in found] == [("update_ratio_low", "a.weight")]


def test_update_ratio_low_while_later_layers_learn_blames_the_gradient_flow():
    """The early layer barely moves, a later one moves normally: a low-update finding that
    points at the gradient flow, not the learning rate (this branch once left its kind unset,
    an internal error that dropped the rule)."""
    s = np.arange(0, 200, 10)
    series = {
        ("early.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-8)),
        ("late.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
    }
    li = info(params=("early.weight", "late.weight"))
    li.rank.update({"early": 0, "late": 1})
    found, _ = diagnose(series, li)
    assert [(f["kind"], f["layer"]) for f in found] == [("update_ratio_low", "early.weight")]
    assert "gradient flow" in found[0]["suggestion"]


# -- loss -----------------------------------------------------------------------------------------
def test_one_poisoned_batch_is_a_loss_spike_at_its_step():
    loss = noisy(200, level=0.5, spread=0.2)
    loss[120] = 400.0
    found, _ = diagnose({(RUN_LAYER, "run", "loss"): (np.arange(200), loss)}, info(), chunks=2)
    assert [(f["kind"], f["first_step"], f["last_step"]) for f in found] == [
        ("loss_spike", 120, 120)
    ]


def test_noisy_heavy_tailed_loss_is_not_a_spike():
    rng = np.random.default_rng(3)
    loss = 2.0 * np.exp(-np.arange(400) / 200) + rng.gamma(2.0, 0.1, 400)
    assert diagnose({(RUN_LAYER, "run", "loss"): (np.arange(400), loss)}, info(), chunks=4)[0] == []


# -- non-finite -----------------------------------------------------------------------------------
def test_nonfinite_loss_is_forward_and_one_finding_for_the_run():
    loss = np.ones(50)
    loss[20:] = np.nan
    found, announced = diagnose(
        {(RUN_LAYER, "run", "loss"): (np.arange(50), loss)}, info(), chunks=5
    )
    assert [(f["kind"], f["phase"], f["first_step"], f["last_step"]) for f in found] == [
        ("nonfinite", "forward", 20, 49)
    ]
    assert announced == [("nonfinite", True)]


def test_nonfinite_gradients_with_finite_loss_are_backward_nearest_the_loss():
    s = np.arange(30)
    c1, c2 = np.zeros(30), np.zeros(30)
    c1[12] = 3
    c2[12] = 5
    series = {
        (RUN_LAYER, "run", "loss"): (s, np.ones(30)),
        ("enc.weight", "param", "grad_nonfinite"): (s, c1),
        ("head.weight", "param", "grad_nonfinite"): (s, c2),
    }
    found, _ = diagnose(series, info(params=("enc.weight", "head.weight")))
    assert [(f["kind"], f["phase"], f["layer"], f["first_step"]) for f in found] == [
        ("nonfinite", "backward", "head", 12)
    ]


# -- engine ---------------------------------------------------------------------------------------
def test_a_condition_that_returns_much_later_is_a_new_finding():
    series = _site("a", "act_dead_fraction", [0.9] * 5 + [0.0] * 40 + [0.9] * 5)
    found, announced = diagnose(series, info(sites=("a",), families={"a": "rectifier"}), chunks=5)
    assert [(f["first_step"], f["last_step"]) for f in found] == [(0, 40), (450, 490)]
    assert len(announced) == 2


def test_a_continuing_condition_extends_one_finding_across_flushes():
    series = _site("a", "act_dead_fraction", [0.9] * 60)
    found, announced = diagnose(series, info(sites=("a",), families={"a": "rectifier"}), chunks=6)
    assert [(f["first_step"], f["last_step"]) for f in found] == [(0, 590)]
    assert announced == [("dead_units", True)]


def test_a_rule_that_raises_does_not_stop_the_others():
    def broken(rec, t):
        raise ZeroDivisionError("boom")

    from gradscope.rules.engine import RULES

    d = Diagnoser(Thresholds(), lambda f, new: None, rules=(broken, *RULES))
    d.update(
        table(_site("a", "act_dead_fraction", [0.9] * 6)),
        info(sites=("a",), families={"a": "rectifier"}),
    )
    assert [f["kind"] for f in d.findings] == ["dead_units"]
    assert d.errors == ["broken: ZeroDivisionError('boom')"]


def test_trailing_stats_skip_missing_and_nonfinite_values():
    col = np.array([1.0, np.nan, 2.0, np.inf, 3.0, 4.0])[:, None]
    med, mad, top = trailing_stats(col, window=2, min_obs=2)
    assert np.isnan(med[2, 0])  # one finite value before it
    assert med[4, 0] == 1.5 and top[4, 0] == 2.0  # the inf is not history
    assert med[5, 0] == 2.5 and mad[5, 0] == 0.5


# -- thresholds -----------------------------------------------------------------------------------
def test_thresholds_reject_unknown_and_bad_values():
    with pytest.raises(TypeError, match=r"unknown name 'dead_fracion'.*'dead_fraction'"):
        Thresholds.from_any({"dead_fracion": 0.5})
    with pytest.raises(ValueError, match=r"patience=0: expected an integer >= 1"):
        Thresholds(patience=0)
    with pytest.raises(ValueError, match="spike_ratio=nan"):
        Thresholds(spike_ratio=float("nan"))
    assert Thresholds.from_any({"dead_fraction": 0.6}).dead_fraction == 0.6


def test_an_earlier_origin_replacing_an_announced_nonfinite_finding_is_announced():
    """The tracer reports poisoned weights at step 34 first (announced); the records, flushed
    later, show the NaN began at step 33: the finding changes, and that change is announced,
    so the line printed first does not stand uncorrected."""
    announced = []
    d = Diagnoser(Thresholds(), lambda f, new: announced.append((f["first_step"], new)))
    d.merge(
        traced_episode(
            {
                "step": 34,
                "phase": "optimizer",
                "module": "body.0",
                "class": "Linear",
                "poisoned": True,
            }
        )
    )
    d.merge(
        Episode(
            "nonfinite",
            RUN_LAYER,
            33,
            40,
            "error",
            {"traced": False},
            "first appeared in the forward pass at step 33",
            "guard it",
            {"phase": "forward", "module": None, "class": None},
        )
    )
    [f] = d.findings
    assert f["first_step"] == 33 and "step 33" in f["message"]
    assert announced == [(34, True), (33, False)]


# -- signals calibrated on the pathology corpus ----------------------------------------------------
def test_one_step_gradient_spike_with_its_loss_is_a_bad_batch_not_exploding():
    """A mislabelled batch: the loss jumps 300x and the gradients 100x on one step. That is a
    loss spike (one bad batch), not exploding gradients (they do not recur)."""
    n = 120
    loss = noisy(n, level=0.5, spread=0.05, seed=2)
    loss[80] *= 300
    w = noisy(n, seed=1)
    w[80] *= 100
    total = noisy(n, level=2.0, seed=4)
    total[80] *= 100
    series = {
        **grads({"fc.weight": w}),
        (RUN_LAYER, "run", "loss"): (np.arange(n), loss),
        (RUN_LAYER, "run", "grad_norm_total"): (np.arange(n), total),
    }
    found, _ = diagnose(series, info(params=("fc.weight",)))
    assert [(f["kind"], f["first_step"]) for f in found] == [("loss_spike", 80)]


def test_a_loss_jump_within_its_log_noise_counts_when_the_gradients_spiked_with_it():
    n = 120
    rng = np.random.default_rng(0)
    loss = 10 ** rng.normal(-1.0, 0.4, n)  # a loss spread over decades (a small batch)
    loss[90] = 40 * np.median(loss[40:90])  # within ~4 robust deviations on a log scale
    steady = noisy(n, level=1.0, spread=0.05, seed=5)
    spiked = steady.copy()
    spiked[90] *= 50
    base = {(RUN_LAYER, "run", "loss"): (np.arange(n), loss)}
    quiet = {**base, (RUN_LAYER, "run", "grad_norm_total"): (np.arange(n), steady)}
    loud = {**base, (RUN_LAYER, "run", "grad_norm_total"): (np.arange(n), spiked)}
    assert [f["kind"] for f in diagnose(quiet, info())[0]] == []
    assert [(f["kind"], f["first_step"]) for f in diagnose(loud, info())[0]] == [("loss_spike", 90)]


def test_a_gradient_many_times_its_weight_before_any_history_is_exploding():
    """No history at step 0, but a gradient 60x the norm of its own weight (a recurrent
    weight scaled 3x) is evidence on its own."""
    s = np.arange(0, 60, 10)
    series = {
        ("rnn.weight_hh", "param", "weight_norm"): (s, np.full(s.size, 7.0)),
        ("rnn.weight_hh", "param", "grad_norm"): (np.arange(60), np.r_[420.0, np.full(59, 0.3)]),
        ("fc.weight", "param", "weight_norm"): (s, np.full(s.size, 3.0)),
        ("fc.weight", "param", "grad_norm"): (np.arange(60), np.full(60, 0.5)),
        ("rnn.weight_hh", "param", "update_ratio"): (s, np.r_[0.5, np.full(s.size - 1, 2e-3)]),
        ("fc.weight", "param", "update_ratio"): (s, np.full(s.size, 2e-3)),
    }
    found, _ = diagnose(series, info(params=("rnn.weight_hh", "fc.weight")))
    [f] = found
    assert (f["kind"], f["layer"], f["first_step"]) == ("exploding_gradients", "rnn.weight_hh", 0)
    assert f["evidence"]["grad_weight_ratio"] == pytest.approx(60.0)
    assert f["severity"] == "error"  # 10x grad_weight_ratio
    # the same gradient with no learning rate behind it (a summed loss, lr 0) moves nothing
    still = {**series, ("rnn.weight_hh", "param", "update_ratio"): (s, np.full(s.size, 0.0))}
    assert diagnose(still, info(params=("rnn.weight_hh", "fc.weight")))[0] == []


def test_depth_growth_right_before_a_divergence_needs_no_patience():
    names = tuple(f"layer{i}" for i in range(6))
    series = {
        (n, "module", "output_grad_norm"): (np.array([0]), np.array([3.0 ** (6 - i)]))
        for i, n in enumerate(names)
    }
    series[(RUN_LAYER, "run", "loss")] = (
        np.arange(6),
        np.r_[1.0, 2.0, 50.0, np.inf, np.inf, np.inf],
    )
    found, _ = diagnose(series, info(sites=names))
    assert ("exploding_gradients", "layer0", 0) in [
        (f["kind"], f["layer"], f["first_step"]) for f in found
    ]
    del series[(RUN_LAYER, "run", "loss")]
    assert [f["kind"] for f in diagnose(series, info(sites=names))[0]] == []  # one check only


def test_nan_activations_are_not_dead_or_saturated_units():
    """A NaN activation's fractions are non-finite (stored as inf): the nonfinite finding's,
    not dead units (every NaN run of the corpus once raised dead_units as well)."""
    series = {
        **_site("act", "act_dead_fraction", [np.inf] * 6),
        **_site("sig", "act_saturation", [np.inf] * 6),
    }
    li = info(sites=("act", "sig", "out"), families={"act": "rectifier", "sig": "sigmoid"})
    li.module_of["out.weight"] = "out"
    assert diagnose(series, li)[0] == []


def test_milder_vanishing_needs_the_first_layers_still_while_the_loss_does_not_fall():
    """0.35 per layer over 6 layers (5e-3: above depth_vanish_ratio, below depth_starve_ratio)
    from the first check is vanishing only with both consequences: the first weight matrix
    moving 1e-3 as fast as the last, relative to its size, while the loss does not fall."""
    names = tuple(f"layer{i}" for i in range(6))
    s = np.arange(0, 120, 10)
    series = {
        (n, "module", "output_grad_norm"): (s, np.full(s.size, 0.35 ** (6 - i)))
        for i, n in enumerate(names)
    }
    still = {
        ("layer0.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-6)),
        ("layer5.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
    }
    moving = {
        ("layer0.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-4)),
        ("layer5.weight", "param", "update_ratio"): (s, np.full(s.size, 1e-3)),
    }
    flat = {(RUN_LAYER, "run", "loss"): (np.arange(120), np.full(120, 2.3))}
    fell = {(RUN_LAYER, "run", "loss"): (np.arange(120), np.linspace(2.3, 0.3, 120))}
    li = info(sites=names, params=("layer0.weight", "layer5.weight"))
    found, _ = diagnose({**series, **still, **flat}, li)
    assert [(f["kind"], f["layer"]) for f in found] == [("vanishing_gradients", "layer0")]
    assert found[0]["first_step"] >= 50  # the loss needs `history` steps to say it is flat
    assert found[0]["evidence"]["first_last_update_ratio"] == pytest.approx(1e-3)
    assert diagnose({**series, **still, **fell}, li)[0] == []  # it learns all the same
    assert diagnose({**series, **moving, **flat}, li)[0] == []  # the first layers move
    assert diagnose({**series, **still}, li)[0] == []  # no loss: no consequence known
