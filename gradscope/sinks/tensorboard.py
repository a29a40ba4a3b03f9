"""TensorBoard logs in ``tb/``: scalars, a Custom Scalars layout, findings and remedies as text,
and gradient histograms when asked for.

Tags:

* ``<metric>/<layer>`` (``grad_norm/layers.3.weight``) and run-level ``<metric>`` (``loss``);
* ``<metric>/_min``, ``<metric>/_median``, ``<metric>/_max``: across every layer of a metric
  recorded for more layers than ``Config.tb_max_layers``, which then keeps per-layer tags for
  the worst layers only (:class:`_Metric`, :data:`WORST`; Lightning #1462 and #11471: one tag
  per parameter buries the few that matter);
* ``findings/<kind>/<layer>`` (``findings/<kind>`` for run-level and ``nonfinite`` findings):
  the finding as text, at its first step. One tag per finding, not one ``findings`` tag:
  TensorBoard's data server (``--load_fast``, used where it is installed) keeps one point per
  step of a tag and drops every point at or after a step written again (checked with
  tensorboard 2.21), and findings are raised late and often share a first step;
* ``remedies``: remedy actions as text, at their step;
* ``grad_hist/<parameter>``: gradient histograms (``Config.histograms``), for the parameters
  whose ``grad_norm`` tag is written;
* ``custom_scalars__config__``: the Custom Scalars layout (one multi-line chart per metric
  across layers, categories ``gradients``, ``updates``, ``activations``, ``run``), written
  again whenever the set of tags grows; TensorBoard reads the last one.

The bytes themselves are written by :mod:`gradscope.sinks.tfevents`.
"""

from __future__ import annotations

import time
from itertools import chain
from pathlib import Path
from typing import Any

from ..records import RUN_LAYER, LongTable
from .tb_layout import (
    AGGREGATES,
    _Metric,
    finding_text,
    is_named,
    layout,
    layout_summary,
    remedy_text,
    tag,
    text_summary,
    worst,
)
from .tb_layout import CATEGORIES as CATEGORIES
from .tb_layout import CATEGORY as CATEGORY
from .tb_layout import LAYOUT_TAG as LAYOUT_TAG
from .tb_layout import WORST as WORST
from .tfevents import EventFile, histogram_value, scalar_event, value_prefix

HIST_TAG = "grad_hist"
_HIST = "_hist_"  # raw histogram columns (gradscope.probes.grads.HIST_METRICS)


class TensorBoardSink:
    """Writes flushed records, findings and remedy actions to TensorBoard.

    Args:
        log_dir: The ``tb/`` directory (created at the first write).
        max_layers: Per-layer tags per metric (``Config.tb_max_layers``; 0: every layer).
        raw: The tables it is given still hold the raw working columns (``_...``), among them
            the gradient histograms (``Config.histograms``); otherwise only published ones.
    """

    def __init__(self, log_dir: Path, max_layers: int = 50, raw: bool = False) -> None:
        import numpy as np

        self.log_dir = log_dir
        self.max_layers = max_layers
        self.raw = raw
        self._file: EventFile | None = None
        self._columns: list[tuple[str, str, str]] = []  # the columns classified so far
        self._prefixes: list[bytes] = []  # encoded tag of each shown column (b"" otherwise)
        self._prefix_len = np.zeros(0, dtype=np.int64)  # [columns] len(_prefixes[c])
        self._show = np.zeros(0, dtype=bool)  # [columns] written as a scalar tag
        self._metric_of = np.zeros(0, dtype=np.int64)  # [columns] index in _metrics, or -1
        self._pos = np.zeros(0, dtype=np.int64)  # [columns] index in its metric's cols
        self._hist_of = np.zeros(0, dtype=np.int64)  # [columns] index in _hist_layers, or -1
        self._hist_slot = np.zeros(0, dtype=np.int64)  # [columns] 0 min, 1 max, 2+ counts
        self._metrics: list[_Metric] = []
        self._metric_index: dict[str, int] = {}
        self._run_metrics: list[str] = []
        self._run_undecided: list[int] = []  # run-level columns without a value so far
        self._hist_layers: list[str] = []
        self._hist_index: dict[str, int] = {}
        self._agg_prefixes: dict[str, list[bytes]] = {}
        self._named: set[str] = set()  # layers (and modules) named by findings
        self._named_new = False
        self._filtered = raw  # some record may not be written as a tag
        self._layout_dirty = False

    # -- records ----------------------------------------------------------------------------------
    def write(self, table: LongTable) -> None:
        """Write a flushed table: one event per step (scalars, aggregates, histograms)."""
        if not len(table):
            return
        import numpy as np

        if len(table.columns) > len(self._columns):
            self._add_columns(table.columns)
        if self._named_new:
            self._show_named()
        if self._run_undecided or any(m.undecided for m in self._metrics):
            self._decide(table)
        file = self._open()
        if self._layout_dirty:
            self._write_layout(file)
        extra: dict[int, list[bytes]] = {}  # step -> encoded values besides the table's own
        if any(m.capped for m in self._metrics):
            self._aggregates(table, extra)
        if self._hist_layers:
            self._histograms(table, extra)
        steps, cols, values = table.step, table.col, table.value
        if self._filtered:
            keep = self._show[cols]
            steps, cols, values = steps[keep], cols[keep], values[keep]
        now = time.time()
        if len(cols):
            # every record's bytes (tag prefix + float32) joined at C speed, then cut per step
            packed = np.asarray(values, dtype="<f4").tobytes()  # TensorBoard stores float32
            floats = [packed[k : k + 4] for k in range(0, len(packed), 4)]
            blob = b"".join(
                chain.from_iterable(zip(map(self._prefixes.__getitem__, cols.tolist()), floats))
            )
            ends = np.cumsum(self._prefix_len[cols] + 4)
            bounds = np.flatnonzero(np.diff(steps)) + 1  # records are grouped by step
            start = 0
            for step, stop in zip(
                steps[np.r_[0, bounds]].tolist(), ends[np.r_[bounds - 1, len(cols) - 1]].tolist()
            ):
                summary = blob[start:stop]
                if extra:
                    summary += b"".join(extra.pop(step, ()))
                file.write(scalar_event(step, now, summary))
                start = stop
        for step, parts in sorted(extra.items()):  # steps with nothing but histograms
            file.write(scalar_event(step, now, b"".join(parts)))
        file.flush()

    def _open(self) -> EventFile:
        if self._file is None:
            self._file = EventFile(self.log_dir)
        return self._file

    def _add_columns(self, columns: list[tuple[str, str, str]]) -> None:
        """Classify the columns new since the last flush (columns are only ever appended)."""
        import numpy as np

        first = len(self._columns)
        grow = len(columns) - first
        self._show = np.concatenate([self._show, np.zeros(grow, dtype=bool)])
        self._prefix_len = np.concatenate([self._prefix_len, np.zeros(grow, dtype=np.int64)])
        minus = np.full(grow, -1, dtype=np.int64)
        self._metric_of = np.concatenate([self._metric_of, minus])
        self._pos = np.concatenate([self._pos, minus])
        self._hist_of = np.concatenate([self._hist_of, minus])
        self._hist_slot = np.concatenate([self._hist_slot, minus])
        for c in range(first, len(columns)):
            layer, _, metric = columns[c]
            self._columns.append(columns[c])
            self._prefixes.append(b"")
            if metric.startswith(_HIST):
                h = self._hist_index.get(layer)
                if h is None:
                    h = self._hist_index[layer] = len(self._hist_layers)
                    self._hist_layers.append(layer)
                slot = metric[len(_HIST) :]
                self._hist_of[c] = h
                self._hist_slot[c] = 0 if slot == "min" else 1 if slot == "max" else 2 + int(slot)
            elif metric.startswith("_"):  # a raw working column
                pass
            elif layer == RUN_LAYER:  # always a tag, from its first value on
                self._run_undecided.append(c)
            else:
                k = self._metric_index.get(metric)
                if k is None:
                    k = self._metric_index[metric] = len(self._metrics)
                    self._metrics.append(_Metric(metric))
                m = self._metrics[k]
                self._metric_of[c] = k
                self._pos[c] = len(m.cols)
                m.cols.append(c)
                if not m.capped:
                    m.undecided.append(c)
                elif is_named(self._named, layer):
                    self._show_column(c)
        self._update_filtered()

    def _update_filtered(self) -> None:
        """Records need filtering when some column of theirs has no tag: a capped metric's, or
        raw ones (published tables have no rows in raw columns)."""
        self._filtered = self.raw or any(len(m.shown) < len(m.cols) for m in self._metrics)

    def _show_column(self, c: int) -> None:
        layer, _, metric = self._columns[c]
        self._show[c] = True
        self._prefixes[c] = value_prefix(tag(layer, metric))
        self._prefix_len[c] = len(self._prefixes[c])
        k = int(self._metric_of[c])
        if k >= 0:
            self._metrics[k].shown.append(c)
        self._layout_dirty = True

    def _decide(self, table: LongTable) -> None:
        """Tags for the undecided columns that have data in this table (see :class:`_Metric`)."""
        import numpy as np

        present = np.bincount(table.col, minlength=len(self._columns)) > 0
        for c in [c for c in self._run_undecided if present[c]]:
            self._run_undecided.remove(c)
            self._run_metrics.append(self._columns[c][2])
            self._show_column(c)
        for m in self._metrics:
            ready = [c for c in m.undecided if present[c]]
            if not ready:
                continue
            m.undecided = [c for c in m.undecided if not present[c]]
            room = self.max_layers - len(m.shown) if self.max_layers else len(ready)
            if len(ready) > room:
                m.capped = True
                self._agg_prefixes[m.name] = [value_prefix(f"{m.name}/{a}") for a in AGGREGATES]
                named = [c for c in ready if is_named(self._named, self._columns[c][0])]
                rest = [c for c in ready if c not in named]
                ready = named + worst(
                    m.name, rest, max(room - len(named), 0), table, len(self._columns)
                )
            for c in sorted(ready):
                self._show_column(c)
        self._update_filtered()

    def _aggregates(self, table: LongTable, extra: dict[int, list[bytes]]) -> None:
        """``<metric>/_min``, ``_median``, ``_max`` over every layer of each capped metric, per
        step. A NaN in any layer makes all three NaN: an aggregate never hides one."""
        import numpy as np

        metric_of = self._metric_of[table.col]
        for k, m in enumerate(self._metrics):
            if not m.capped:
                continue
            sel = metric_of == k
            if not sel.any():
                continue
            val = table.value[sel]
            steps, row = np.unique(table.step[sel], return_inverse=True)
            mat = np.full((len(steps), len(m.cols)), np.inf)  # [steps, layers]; inf: no value
            mat[row, self._pos[table.col[sel]]] = val
            n = np.bincount(row, minlength=len(steps))
            nan = np.bincount(row, weights=np.isnan(val), minlength=len(steps)) > 0
            mat.sort(axis=1)
            r = np.arange(len(steps))
            agg = np.stack(
                [mat[:, 0], (mat[r, (n - 1) // 2] + mat[r, n // 2]) / 2, mat[r, n - 1]], axis=1
            )  # [steps, 3]
            agg[nan] = np.nan
            packed = agg.astype("<f4").tobytes()
            p_min, p_med, p_max = self._agg_prefixes[m.name]
            for i, step in enumerate(steps.tolist()):
                b = packed[12 * i : 12 * i + 12]
                extra.setdefault(step, []).append(p_min + b[0:4] + p_med + b[4:8] + p_max + b[8:12])

    def _histograms(self, table: LongTable, extra: dict[int, list[bytes]]) -> None:
        """One histogram per parameter and sampled step, from the raw ``_hist_*`` columns;
        only for the parameters whose ``grad_norm`` tag is written."""
        import numpy as np

        hist = self._hist_of[table.col]
        sel = hist >= 0
        if not sel.any():
            return
        grad = self._metric_index.get("grad_norm")
        shown = (
            None
            if grad is None or not self._metrics[grad].capped
            else {self._columns[c][0] for c in self._metrics[grad].shown}
        )
        n_layers = len(self._hist_layers)
        key = table.step[sel] * n_layers + hist[sel]
        keys, row = np.unique(key, return_inverse=True)
        data = np.full((len(keys), int(self._hist_slot.max()) + 1), np.nan)  # [hists, 2 + bins]
        data[row, self._hist_slot[table.col[sel]]] = table.value[sel]
        for step, h, d in zip((keys // n_layers).tolist(), (keys % n_layers).tolist(), data):
            layer = self._hist_layers[h]
            if (shown is not None and layer not in shown) or not np.isfinite(d).all():
                continue  # not shown, or non-finite gradients (grad_nonfinite counts them)
            extra.setdefault(step, []).append(
                histogram_value(f"{HIST_TAG}/{layer}", float(d[0]), float(d[1]), d[2:])
            )

    # -- findings ---------------------------------------------------------------------------------
    def _show_named(self) -> None:
        self._named_new = False
        for m in self._metrics:
            if not m.capped:
                continue
            for c in m.cols:
                if (
                    not self._show[c]
                    and c not in m.undecided
                    and is_named(self._named, self._columns[c][0])
                ):
                    self._show_column(c)
        self._update_filtered()

    # -- layout -----------------------------------------------------------------------------------
    def layout(self) -> Any:
        """The Custom Scalars layout of the tags written so far (a ``layout_pb2.Layout``)."""
        return layout(self._metrics, self._columns, self._run_metrics)

    def _write_layout(self, file: EventFile) -> None:
        """As ``SummaryWriter.add_custom_scalars`` writes it (at step 0, every time)."""
        self._layout_dirty = False
        file.write(scalar_event(0, time.time(), layout_summary(self.layout())))

    # -- events -----------------------------------------------------------------------------------
    def event(self, record: dict[str, Any]) -> None:
        """Findings (``findings/...``) and remedy actions (``remedies``) as text, at their
        step. Other events are left to ``events.jsonl``."""
        kind = record.get("event")
        if kind in ("finding", "finding_updated"):
            self._finding(record)
        elif kind in ("remedy", "remedies"):
            self._text("remedies", *remedy_text(record))

    def _finding(self, f: dict[str, Any]) -> None:
        layer = f.get("layer")
        for name in (layer, f.get("module"), *(f.get("layers") or [])):
            if isinstance(name, str) and name != RUN_LAYER and name not in self._named:
                self._named.add(name)
                self._named_new = True
        self._text(*finding_text(f), f.get("first_step"))

    def _text(self, name: str, text: str, step: Any) -> None:
        summary = text_summary(name, text)
        file = self._open()
        file.write(scalar_event(step if isinstance(step, int) else 0, time.time(), summary))
        file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
