"""TensorBoard output read back with TensorBoard's own reader (EventAccumulator) and compared
with the Parquet store: scalar tags and values, the Custom Scalars layout, findings as text,
the per-metric tag cap on a 200-layer model, and gradient histograms."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.probes.grads import fixed_range_counts, grad_histograms
from gradscope.records import RUN_LAYER, LongTable
from gradscope.sinks.tensorboard import AGGREGATES, LAYOUT_TAG, TensorBoardSink, tag

from models import mlp, mostly_dead_linear


def _read(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def _layout(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = acc.Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])  # TensorBoard reads the last
    return layout, len(events)


def _charts(layout):
    return {
        chart.title: (category.title, chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }


def _matching(patterns, tags):
    """Tags matched as TensorBoard's custom-scalars backend matches them (``re.match``)."""
    return {t for p in patterns for t in tags if re.match(p, t)}


def _store(run_dir):
    df = gradscope.load_run(run_dir).metrics
    df = df.assign(layer=df["layer"].astype(str), metric=df["metric"].astype(str))
    return df.sort_values("step", kind="stable")


def _assert_tag_equals_store(acc, df, layer, metric, from_step=0):
    rows = df[(df["layer"] == layer) & (df["metric"] == metric) & (df["step"] >= from_step)]
    events = acc.Scalars(tag(layer, metric))
    assert [e.step for e in events] == rows["step"].tolist()
    expected = rows["value"].to_numpy(dtype=np.float32).astype(float)  # TensorBoard: float32
    np.testing.assert_array_equal([e.value for e in events], expected)


# -- a small model: every layer, the layout, findings --------------------------------------------
@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    """mostly_dead_linear: a dead_units finding on the ReLU "1" from step 0; several flushes."""
    torch.manual_seed(0)
    model = mostly_dead_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(64, 4)
    out = tmp_path_factory.mktemp("runs")
    with gradscope.watch(
        model, opt, out=out, activation_every=1, flush_every=3, quiet=True
    ) as scope:
        for _ in range(8):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    return scope


def test_every_record_is_a_scalar_equal_to_the_store(dead_run):
    acc = _read(dead_run.run_dir)
    df = _store(dead_run.run_dir)
    pairs = set(zip(df["layer"], df["metric"]))
    assert set(acc.Tags()["scalars"]) == {tag(layer, metric) for layer, metric in pairs}
    assert {"grad_norm/0.weight", "act_dead_fraction/1", "loss", "grad_norm_total"} <= set(
        acc.Tags()["scalars"]
    )
    for layer, metric in pairs:
        _assert_tag_equals_store(acc, df, layer, metric)
    assert acc.Tags()["histograms"] == []  # off by default


def test_findings_are_text_at_their_first_step(dead_run):
    acc = _read(dead_run.run_dir)
    findings = gradscope.load_run(dead_run.run_dir).findings
    assert [(f["kind"], f["layer"], f["first_step"]) for f in findings] == [("dead_units", "1", 0)]
    events = acc.Tensors("findings/dead_units/1")
    assert [e.step for e in events] == [0]
    shown, _ = _rendered(events[0].tensor_proto.string_val[0].decode())
    assert findings[0]["message"] in shown and findings[0]["suggestion"] in shown
    meta = acc.SummaryMetadata("findings/dead_units/1")
    assert meta.plugin_data.plugin_name == "text"


def _rendered(markdown: str) -> tuple[str, list[str]]:
    """The text TensorBoard's text plugin shows for ``markdown``, and the HTML tags around it:
    its own Markdown-to-HTML (Python-Markdown and its sanitiser), read with an HTML parser."""
    import warnings
    from html.parser import HTMLParser

    with warnings.catch_warnings():  # its vendored html5lib warns about itself on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.plugin_util import markdown_to_safe_html

        html = markdown_to_safe_html(markdown)

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.parts.append(data)

    parser = Text()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts), parser.tags


HOSTILE = "blocks.0._orig_mod.w*[x]<b>"


def test_finding_and_remedy_text_shows_names_literally(tmp_path):
    """Layer names and values are escaped for Markdown: TensorBoard shows them as they are
    (no emphasis from ``*``/``_``, no link from ``[x]``, no tag from ``<b>``)."""
    sink = TensorBoardSink(tmp_path / "tb", max_layers=5)
    message = f"50% of the units of {HOSTILE} are dead: *not* a [link](x) # or `code` & <i>"
    sink.event(
        {
            "event": "finding",
            "kind": "dead_units",
            "layer": HOSTILE,
            "severity": "warning",
            "first_step": 3,
            "last_step": 9,
            "message": message,
            "suggestion": "swap it (swap='relu->leaky_relu:0.2'); 1. lower the lr_",
        }
    )
    sink.event(
        {
            "event": "remedy",
            "remedy": "swap",
            "action": "swapped",
            "step": 4,
            "layer": HOSTILE,
            "from": "ReLU",
            "to": "LeakyReLU(0.2)",
        }
    )
    sink.close()
    acc = _read(tmp_path)
    (event,) = acc.Tensors(f"findings/dead_units/{HOSTILE}")
    raw = event.tensor_proto.string_val[0].decode()
    assert HOSTILE not in raw and "\\*\\[x\\]&lt;b&gt;" in raw  # escaped in the record
    shown, tags = _rendered(raw)
    assert tags == ["p", "strong", "p", "p"]  # **warning** is the only markup
    assert shown == (
        f"warning: {message}\nlayer {HOSTILE}, from step 3\n"
        "swap it (swap='relu->leaky_relu:0.2'); 1. lower the lr_"
    )
    (remedy,) = acc.Tensors("remedies")
    assert remedy.step == 4
    shown, tags = _rendered(remedy.tensor_proto.string_val[0].decode())
    assert tags == ["p"]
    assert shown == (
        'remedy: "swap"; action: "swapped"; step: 4; layer: "'
        + HOSTILE
        + '"; from: "ReLU"; to: "LeakyReLU(0.2)"'
    )


def test_layout_has_one_chart_per_metric_naming_the_written_tags(dead_run):
    acc = _read(dead_run.run_dir)
    assert acc.SummaryMetadata(LAYOUT_TAG).plugin_data.plugin_name == "custom_scalars"
    layout, _ = _layout(acc)
    charts = _charts(layout)
    tags = set(acc.Tags()["scalars"])
    assert [c.title for c in layout.category] == ["gradients", "updates", "activations", "run"]
    assert [c.title for c in layout.category[0].chart][:3] == [
        "grad_norm_total",
        "grad_norm",
        "grad_max_abs",
    ]
    assert charts["grad_norm"][0] == "gradients"
    assert _matching(charts["grad_norm"][1], tags) == {
        t for t in tags if t.startswith("grad_norm/")
    }
    assert charts["update_ratio"][0] == "updates"
    assert _matching(charts["act_dead_fraction"][1], tags) == {"act_dead_fraction/1"}
    assert _matching(charts["loss"][1], tags) == {"loss"} and charts["loss"][0] == "run"
    assert charts["grad_norm_total"][0] == "gradients"
    covered = set()
    for _, patterns in charts.values():
        matched = _matching(patterns, tags)
        assert matched, f"a chart names no written tag: {patterns}"
        covered |= matched
    assert covered == tags


def test_layout_is_written_again_when_a_model_joins(out):
    a, b = mlp(), mlp()
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.01)
    x = torch.randn(8, 8)
    with gradscope.watch(a, opt, out=out, flush_every=2, quiet=True) as scope:
        for step in range(6):
            if step == 3:
                scope.add_model(b, "critic")
            opt.zero_grad()
            (a(x).square().mean() + b(x).square().mean()).backward()
            opt.step()
    acc = _read(scope.run_dir)
    layout, count = _layout(acc)
    assert count >= 2
    grad_norm = _charts(layout)["grad_norm"][1]
    assert _matching(grad_norm, {"grad_norm/critic.0.weight", "grad_norm/0.weight"}) == {
        "grad_norm/critic.0.weight",
        "grad_norm/0.weight",
    }
    assert acc.Scalars("grad_norm/critic.0.weight")[0].step == 3


# -- a 200-layer model: bounded tags ------------------------------------------------------------
def _deep(n=200, width=8):
    """n x (Linear near the identity + ReLU); the last layer's units 4.. are dead for positive
    inputs (a dead_units finding on the last ReLU, born dead)."""
    layers: list[nn.Module] = []
    for _ in range(n):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(width) + 0.01 * torch.randn(width, width))
            lin.bias.zero_()
        layers += [lin, nn.ReLU()]
    with torch.no_grad():
        lin.weight[width // 2 :] = 0.0
        lin.bias[width // 2 :] = -1.0
    return nn.Sequential(*layers)


FLUSH = 4


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    torch.manual_seed(0)
    model = _deep()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(16, 8)
    out = tmp_path_factory.mktemp("runs")
    with gradscope.watch(
        model,
        opt,
        out=out,
        activation_every=2,
        flush_every=FLUSH,
        quiet=True,
        thresholds={"dead_fraction": 0.4},  # the last ReLU is about half dead: one finding
    ) as scope:
        for _ in range(12):
            opt.zero_grad()
            (model(x) - x).square().mean().backward()
            opt.step()
    return scope


def test_a_deep_model_gets_bounded_tags_plus_aggregates(deep_run):
    cap = deep_run.config.tb_max_layers
    acc = _read(deep_run.run_dir)
    df = _store(deep_run.run_dir)
    tags = set(acc.Tags()["scalars"])
    named = {f["layer"] for f in gradscope.load_run(deep_run.run_dir).findings}
    assert named == {"399"}  # dead_units on the last ReLU
    per_layer = df[df["layer"] != RUN_LAYER]
    for metric, rows in per_layer.groupby("metric"):
        layers = set(rows["layer"])
        assert len(layers) == (200 if metric.startswith("act_") else 400)  # ReLUs; all
        shown = {t.split("/", 1)[1] for t in tags if t.startswith(f"{metric}/")}
        assert shown >= {a for a in AGGREGATES}, metric
        shown -= set(AGGREGATES)
        assert shown <= layers and len(shown) <= cap + len(named & layers), metric
        assert named & layers <= shown, f"{metric}: the finding's layer has no tag"
        for layer in sorted(shown - named)[:5]:
            _assert_tag_equals_store(acc, df, layer, metric)
        for layer in named & layers:  # from the flush that raised the finding on
            first = acc.Scalars(tag(layer, metric))[0].step
            assert first <= 2 * FLUSH
            _assert_tag_equals_store(acc, df, layer, metric, from_step=first)
        # min / median / max over every layer at every step
        stats = rows.groupby("step")["value"].agg(["min", "median", "max"])
        for agg, column in zip(AGGREGATES, ("min", "median", "max")):
            events = acc.Scalars(f"{metric}/{agg}")
            assert [e.step for e in events] == stats.index.tolist()
            np.testing.assert_allclose([e.value for e in events], stats[column], rtol=1e-6)
    assert {"loss", "grad_norm_total"} <= tags
    assert len(tags) < 12 * (cap + 4) + 2


def test_the_worst_layers_are_the_extremes_of_the_first_flush(deep_run):
    """grad_norm: the 25 largest and the 25 smallest medians over the first flush's steps;
    act_dead_fraction: the highest (the half-dead last ReLU among them)."""
    acc = _read(deep_run.run_dir)
    df = _store(deep_run.run_dir)
    first = df[(df["step"] < FLUSH) & (df["metric"] == "grad_norm")]
    median = first.groupby("layer")["value"].median().sort_values(kind="stable")
    expected = set(median.index[:25]) | set(median.index[-25:])
    shown = {
        t.split("/", 1)[1]
        for t in acc.Tags()["scalars"]
        if t.startswith("grad_norm/") and t.split("/", 1)[1] not in AGGREGATES
    }
    assert shown == expected
    assert "act_dead_fraction/399" in acc.Tags()["scalars"]
    layout, _ = _layout(acc)
    charts = _charts(layout)
    tags = set(acc.Tags()["scalars"])
    assert _matching(charts["grad_norm (worst layers)"][1], tags) == {
        f"grad_norm/{layer}" for layer in expected
    }
    assert _matching(charts["grad_norm (min, median, max over layers)"][1], tags) == {
        f"grad_norm/{a}" for a in AGGREGATES
    }


# -- the sink on its own: selection rules, findings, aggregates ----------------------------------
def _table(values: dict[str, list[float]], metric="grad_norm", first_step=0) -> LongTable:
    """One record per layer and step: ``values[layer][i]`` at step ``first_step + i``."""
    columns = [(layer, "param", metric) for layer in values] + [(RUN_LAYER, "run", "loss")]
    steps, cols, vals = [], [], []
    n = len(next(iter(values.values())))
    for i in range(n):
        for c, v in enumerate(values.values()):
            steps.append(first_step + i)
            cols.append(c)
            vals.append(v[i])
        steps.append(first_step + i)
        cols.append(len(columns) - 1)
        vals.append(1.0)
    return LongTable(np.array(steps), np.array(cols), np.array(vals, dtype=float), columns)


def test_sink_picks_extremes_first_non_finite_and_adds_finding_layers(tmp_path):
    values = {f"l{i}": [float(i), float(i) + 0.5] for i in range(10)}
    values["l5"] = [5.0, math.nan]  # non-finite: comes first
    sink = TensorBoardSink(tmp_path / "tb", max_layers=5)
    sink.write(_table(values))
    sink.event(
        {
            "event": "finding",
            "kind": "vanishing_gradients",
            "layer": "l3",
            "severity": "warning",
            "first_step": 1,
            "last_step": 1,
            "message": "m",
            "suggestion": "s",
        }
    )
    sink.write(_table(values, first_step=2))
    sink.close()
    acc = _read(tmp_path)
    shown = {t for t in acc.Tags()["scalars"] if t.startswith("grad_norm/l")}
    # l5 (NaN), then of the others: 2 largest (l9, l8), 2 smallest (l0, l1); l3 from step 2
    assert shown == {f"grad_norm/l{i}" for i in (5, 9, 8, 0, 1, 3)}
    assert [e.step for e in acc.Scalars("grad_norm/l3")] == [2, 3]
    assert [e.step for e in acc.Scalars("grad_norm/l0")] == [0, 1, 2, 3]
    medians = [e.value for e in acc.Scalars("grad_norm/_median")]
    assert medians[0] == 4.5 and math.isnan(medians[1])  # a NaN layer: the aggregate is NaN
    assert [e.value for e in acc.Scalars("grad_norm/_max")][2] == 9.0
    assert [e.step for e in acc.Tensors("findings/vanishing_gradients/l3")] == [1]


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("act_dead_fraction", {7, 8, 9}),  # the highest
        ("clip_coef", {0, 1, 2}),  # the smallest: the most clipped
        ("act_mean", {0, 9, 8}),  # the largest magnitude
    ],
)
def test_sink_worst_depends_on_the_metric(tmp_path, metric, expected):
    values = {f"l{i}": [float(i)] for i in range(10)}
    values["l0"] = [-100.0]
    sink = TensorBoardSink(tmp_path / "tb", max_layers=3)
    sink.write(_table(values, metric=metric))
    sink.close()
    shown = {t for t in _read(tmp_path).Tags()["scalars"] if t.startswith(f"{metric}/l")}
    assert shown == {f"{metric}/l{i}" for i in expected}


def test_sink_without_a_cap_writes_every_layer_and_no_aggregate(tmp_path):
    values = {f"l{i}": [float(i)] for i in range(60)}
    sink = TensorBoardSink(tmp_path / "tb", max_layers=0)
    sink.write(_table(values))
    sink.close()
    assert set(_read(tmp_path).Tags()["scalars"]) == {f"grad_norm/l{i}" for i in range(60)} | {
        "loss"
    }


# -- histograms ----------------------------------------------------------------------------------
def test_histograms_are_the_gradients_histc_at_sampled_steps(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 8)
    grads = {}
    with gradscope.watch(
        model, opt, out=out, histograms=True, update_every=2, flush_every=3, quiet=True
    ) as scope:
        for step in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            grads[step] = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
    acc = _read(scope.run_dir)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(acc.Tags()["histograms"]) == sorted(f"grad_hist/{n}" for n in names)
    for name in names:
        events = acc.Histograms(f"grad_hist/{name}")
        assert [e.step for e in events] == [0, 2, 4]
        for e in events:
            g = grads[e.step][name]
            h = e.histogram_value
            assert sum(h.bucket) == h.num == g.numel()
            assert (h.min, h.max) == (float(g.min()), float(g.max()))
            assert h.bucket_limit[-1] == h.max and len(h.bucket) == 30
            ref = torch.histc(g, bins=30, min=float(g.min()), max=float(g.max()))
            assert list(h.bucket) == ref.tolist()
    metrics = set(_store(scope.run_dir)["metric"])
    assert "grad_norm" in metrics and not any(m.startswith("_") for m in metrics)
    # max-abs comes from the histogram's range when both are taken: the same numbers
    peaks = scope.load().wide("grad_max_abs")
    assert peaks.loc[2, "0.weight"] == pytest.approx(float(grads[2]["0.weight"].abs().max()))


@pytest.mark.parametrize("deterministic", [False, True])
def test_off_cpu_binning_counts_like_histc(deterministic):
    """The accelerator path (values mapped to [0, bins], counted over that fixed range, no host
    read), run on the CPU; under deterministic algorithms it counts with index_put_."""
    g = torch.randn(1000)
    g[:3] = torch.tensor([g.min(), g.max(), g.max()])
    lo, hi = g.min(), g.max()
    mapped = ((g - lo) * (30 / (hi - lo))).clamp(0, 30)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        counts = fixed_range_counts(mapped, 30)
    finally:
        torch.use_deterministic_algorithms(before)
    ref = grad_histograms([g])[0, 2:]
    assert counts.sum() == 1000
    assert (counts - ref).abs().max() <= 1  # a value on a bin edge may round either way


def test_histograms_of_constant_and_non_finite_gradients():
    h = grad_histograms([torch.full((5,), 2.0), torch.tensor([1.0, math.nan])])
    assert h[0, :3].tolist() == [2.0, 2.0, 5.0] and h[0, 3:].sum() == 0
    assert math.isnan(h[1, 0])  # left out by TensorBoard; grad_nonfinite counts it


def test_no_tensorboard_writes_no_tb_directory(out):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(
        model, opt, out=out, tensorboard=False, histograms=True, quiet=True
    ) as scope:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
    assert not (scope.run_dir / "tb").exists()
    assert scope.parts.recorder.grads.histograms is False  # nothing computed for nobody
    assert len(scope.load().metrics)


def test_config_checks_the_tensorboard_options():
    assert gradscope.Config().tb_max_layers == 50 and gradscope.Config().histograms is False
    assert gradscope.Config(tb_max_layers=0).tb_max_layers == 0
    with pytest.raises(ValueError, match="tb_max_layers=-1"):
        gradscope.Config(tb_max_layers=-1)
    with pytest.raises(TypeError, match="tb_max_layers"):
        gradscope.Config(tb_max_layers=2.5)
    with pytest.raises(TypeError, match="histograms"):
        gradscope.Config(histograms="yes")
