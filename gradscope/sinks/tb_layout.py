"""What the TensorBoard sink shows besides its scalars: which layers of a capped metric get
tags (:data:`WORST`, :func:`worst`, :func:`is_named`), the Custom Scalars layout
(:func:`layout`), and findings and remedy actions as Markdown text (:func:`finding_text`,
:func:`remedy_text`), with the summaries that carry them (:func:`layout_summary`,
:func:`text_summary`). Used by :class:`gradscope.sinks.tensorboard.TensorBoardSink`;
tensorboard and numpy are imported only when a function needs them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..records import RUN_LAYER

if TYPE_CHECKING:
    from ..records import LongTable

AGGREGATES = ("_min", "_median", "_max")
LAYOUT_TAG = "custom_scalars__config__"

WORST: dict[str, str] = {
    "grad_norm": "both",
    "output_grad_norm": "both",
    "grad_norm_clipped": "both",
    "clip_threshold": "both",
    "weight_norm": "both",
    "update_ratio": "both",
    "act_std": "both",
    "grad_max_abs": "high",
    "grad_nonfinite": "high",
    "weight_nonfinite": "high",
    "act_dead_fraction": "high",
    "act_saturation": "high",
    "act_nonfinite": "high",
    "act_mean": "abs",
    "clip_coef": "low",
}
"""Which layers of a capped metric get tags, ranked by the median of their finite values in
the first flush that has them: ``both`` the largest and the smallest, half each (too large
and too small are both pathologies); ``high`` the largest; ``abs`` the largest magnitude;
``low`` the smallest (the most clipped). Layers with non-finite values come first, ties go to
the earlier layer. Other metrics: ``both``."""

CATEGORY: dict[str, str] = {
    "grad_norm_total": "gradients",
    "grad_norm_total_clipped": "gradients",
    "grad_norm": "gradients",
    "grad_max_abs": "gradients",
    "grad_nonfinite": "gradients",
    "weight_nonfinite": "updates",
    "output_grad_norm": "gradients",
    "grad_norm_clipped": "gradients",
    "clip_coef": "gradients",
    "clip_threshold": "gradients",
    "update_ratio": "updates",
    "weight_norm": "updates",
    "act_dead_fraction": "activations",
    "act_saturation": "activations",
    "act_mean": "activations",
    "act_std": "activations",
    "act_nonfinite": "activations",
}
"""The Custom Scalars category of a metric's charts, in chart order (per-layer metrics; run
level: ``run`` unless named here). Unknown per-layer metrics: ``other``, last."""
_ORDER = {metric: i for i, metric in enumerate(CATEGORY)}
CATEGORIES = ("gradients", "updates", "activations", "run", "other")
_RUN_CHART = {"grad_norm_total_clipped": "grad_norm_total"}  # drawn in the same chart


def tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a record: ``grad_norm/fc1.weight``; run level: ``loss``."""
    return metric if layer == RUN_LAYER else f"{metric}/{layer}"


@dataclass
class _Metric:
    """The per-layer tags of one metric.

    A column (layer) is *undecided* until a flush has its data; then it is shown while the
    metric has room (``cap`` layers). A flush whose new layers do not fit *caps* the metric:
    the worst of them (:data:`WORST`) fill the room, the others never get a tag, nor do layers
    that appear later, except the layers findings name (any time). Tags once written stay:
    a chart whose lines come and go is no chart.
    """

    name: str
    cols: list[int] = field(default_factory=list)  # every column of this metric
    shown: list[int] = field(default_factory=list)
    undecided: list[int] = field(default_factory=list)
    capped: bool = False


def is_named(named: set[str], layer: str) -> bool:
    """Whether a finding named (``named``) this layer, its module (``net.0`` for
    ``net.0.weight``) or its base site (``act`` for ``act#1``)."""
    if not named:
        return False
    name = layer.partition("#")[0]
    if layer in named or name in named:
        return True
    while "." in name:
        name = name.rpartition(".")[0]
        if name in named:
            return True
    return False


def worst(metric: str, cols: list[int], k: int, table: LongTable, n_columns: int) -> list[int]:
    """The ``k`` worst of ``cols`` by this table's records (:data:`WORST`); ``n_columns``: the
    columns classified so far."""
    import numpy as np

    if k <= 0:
        return []
    index = np.full(n_columns, -1, dtype=np.int64)
    index[cols] = np.arange(len(cols))
    i = index[table.col]
    sel = i >= 0
    _, row = np.unique(table.step[sel], return_inverse=True)
    mat = np.full((int(row.max()) + 1, len(cols)), np.nan)  # [steps, cols]; NaN: no value
    mat[row, i[sel]] = table.value[sel]
    finite = np.isfinite(mat)
    n = finite.sum(axis=0)
    n_bad = np.bincount(i[sel], weights=~np.isfinite(table.value[sel]), minlength=len(cols))
    mat = np.sort(np.where(finite, mat, np.inf), axis=0)
    j = np.arange(len(cols))
    median = np.where(n > 0, (mat[(n - 1) // 2, j] + mat[n // 2, j]) / 2, 0.0)
    rows = list(zip(cols, n_bad.astype(int).tolist(), median.tolist()))
    bad = sorted((r for r in rows if r[1]), key=lambda r: (-r[1], r[0]))
    good = [r for r in rows if not r[1]]
    chosen = [r[0] for r in bad[:k]]
    room = k - len(chosen)
    how = WORST.get(metric, "both")
    if how == "abs":
        good = [(c, bad_n, abs(v)) for c, bad_n, v in good]
    high = sorted(good, key=lambda r: (-r[2], r[0]))
    low = sorted(good, key=lambda r: (r[2], r[0]))
    n_high = room if how in ("high", "abs") else 0 if how == "low" else (room + 1) // 2
    chosen += [r[0] for r in high[:n_high]]
    taken = set(chosen)
    chosen += [r[0] for r in low if r[0] not in taken][: room - n_high]
    return chosen


def layout(
    per_layer: list[_Metric], columns: list[tuple[str, str, str]], run_metrics: list[str]
) -> Any:
    """The Custom Scalars layout of the tags written so far (a ``layout_pb2.Layout``): charts
    for the shown tags of the ``per_layer`` metrics (over ``columns``) and the run level's."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: dict[str, list[tuple[int, Any]]] = {c: [] for c in CATEGORIES}

    def chart(category: str, title: str, tags: list[str], metric: str) -> None:
        pattern = "^(?:" + "|".join(re.escape(t) for t in tags) + ")$"
        content = layout_pb2.MultilineChartContent(tag=[pattern])
        charts[category].append(
            (_ORDER.get(metric, len(_ORDER)), layout_pb2.Chart(title=title, multiline=content))
        )

    for m in per_layer:
        if not m.shown:
            continue
        category = CATEGORY.get(m.name, "other")
        tags = [tag(columns[c][0], m.name) for c in sorted(m.shown)]
        if m.capped:
            chart(category, f"{m.name} (worst layers)", tags, m.name)
            chart(
                category,
                f"{m.name} (min, median, max over layers)",
                [f"{m.name}/{a}" for a in AGGREGATES],
                m.name,
            )
        else:
            chart(category, m.name, tags, m.name)
    together: dict[str, list[str]] = {}
    for metric in run_metrics:
        together.setdefault(_RUN_CHART.get(metric, metric), []).append(metric)
    for title, metrics in together.items():
        chart(CATEGORY.get(title, "run"), title, metrics, title)
    return layout_pb2.Layout(
        category=[  # charts of a category in CATEGORY's order (stable)
            layout_pb2.Category(
                title=title, chart=[c for _, c in sorted(charts[title], key=lambda item: item[0])]
            )
            for title in CATEGORIES
            if charts[title]
        ]
    )


def layout_summary(layout_proto: Any) -> bytes:
    """A layout as ``SummaryWriter.add_custom_scalars`` writes it: a serialized ``Summary``."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    tensor = TensorProto(
        dtype=7,
        string_val=[layout_proto.SerializeToString()],  # DT_STRING
        tensor_shape=TensorShapeProto(),
    )
    value = Summary.Value(tag=LAYOUT_TAG, tensor=tensor, metadata=meta)
    serialized: bytes = Summary(value=[value]).SerializeToString()
    return serialized


def remedy_text(record: dict[str, Any]) -> tuple[str, Any]:
    """A remedy action (or a summary of several) as text, and the step to show it at."""
    md = markdown
    text = "; ".join(
        f"{md(k)}: {md(json.dumps(v, default=str))}" for k, v in record.items() if k != "event"
    )
    step = record.get("step")
    if not isinstance(step, int) and isinstance(record.get("steps"), list):
        step = record["steps"][-1]  # a summary of several steps: at the last one
    return text, step


def finding_text(f: dict[str, Any]) -> tuple[str, str]:
    """A finding's tag (``findings/<kind>/<layer>``, or ``findings/<kind>``) and its text."""
    layer = f.get("layer")
    name = f"findings/{f.get('kind')}"
    if isinstance(layer, str) and layer != RUN_LAYER and f.get("kind") != "nonfinite":
        name += f"/{layer}"
    md = markdown
    text = (
        f"**{md(f.get('severity'))}**: {md(f.get('message'))}\n\n"
        f"{md(_layers(f))}, from step {md(f.get('first_step'))}\n\n"
        f"{md(f.get('suggestion'))}"
    )
    return name, text


def _layers(f: dict[str, Any]) -> str:
    """``layer X``, or every layer of a grouped finding (the primary first)."""
    layers = f.get("layers")
    if isinstance(layers, list) and len(layers) > 1:
        return f"{len(layers)} layers: {', '.join(str(x) for x in layers)}"
    return f"layer {f.get('layer')}"


def markdown(value: Any) -> str:
    """``value`` as Markdown that TensorBoard's text plugin (Python-Markdown, then an HTML
    sanitiser) shows literally: its special characters backslash-escaped, ``&``, ``<``
    and ``>`` as HTML entities (a layer ``w*[x]<b>`` is not emphasis, a link, or a tag)."""
    entities = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
    special = "\\`*_{}[]()#+-.!|"  # the characters Python-Markdown lets one escape
    return "".join(entities.get(ch) or ("\\" + ch if ch in special else ch) for ch in str(value))


def text_summary(name: str, text: str) -> bytes:
    """``text`` as the text plugin's ``Summary`` of tag ``name``, serialized."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    tensor = TensorProto(dtype=7, string_val=[text.encode("utf-8")])  # DT_STRING
    summary = Summary(value=[Summary.Value(tag=name, metadata=meta, tensor=tensor)])
    serialized: bytes = summary.SerializeToString()
    return serialized
