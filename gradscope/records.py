"""The record schema: metric names, kinds, and the long table every sink reads.

A record is ``(step, layer, kind, metric, value)``: plain numbers and names, no tensors and no
module references, so Parquet, TensorBoard, pandas and the HTML report all read the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from .buffer import Chunk

LAYER_KINDS = ("param", "module", "run")
"""``param``: one parameter tensor; ``module``: one module output (activation site);
``run``: the whole model (layer name ``(run)``)."""

PARAM_METRICS = (
    "grad_norm",
    "grad_max_abs",
    "grad_nonfinite",
    "weight_norm",
    "weight_nonfinite",
    "update_ratio",
)
MODULE_METRICS = (
    "act_dead_fraction",
    "act_saturation",
    "act_mean",
    "act_std",
    "act_nonfinite",
    "output_grad_norm",
)
RUN_METRICS = (
    "loss",
    "grad_norm_total",
    "skipped_step",
    "amp_scale",
    "guard_skipped",
    "grad_norm_total_clipped",
    "clip_coef",
    "clip_threshold",
    "lr",
)
REMEDY_PARAM_METRICS = ("grad_norm_clipped", "clip_coef", "clip_threshold")
METRICS = tuple(dict.fromkeys(PARAM_METRICS + REMEDY_PARAM_METRICS + MODULE_METRICS + RUN_METRICS))
RUN_LAYER = "(run)"
ROOT = "(root)"
"""Display name of a watched model's root module (PyTorch names it "")."""


@dataclass
class LongTable:
    """Columnar long-format records (``layer``/``kind``/``metric`` as indices into ``columns``)."""

    step: np.ndarray  # [n] int64
    col: np.ndarray  # [n] int64, index into columns
    value: np.ndarray  # [n] float64
    columns: list[tuple[str, str, str]]  # (layer, kind, metric)

    def __len__(self) -> int:
        return int(self.step.shape[0])

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> LongTable:
        import numpy as np

        rows, cols = np.nonzero(chunk.written)  # row-major: grouped by step
        return cls(
            chunk.steps[rows], cols.astype(np.int64), chunk.values[rows, cols], chunk.columns
        )

    @classmethod
    def concat(cls, tables: list[LongTable]) -> LongTable:
        """Tables taken from one buffer, in order (their column lists are prefixes of the last
        one's: columns are only ever appended)."""
        import numpy as np

        if len(tables) == 1:
            return tables[0]
        return cls(
            np.concatenate([t.step for t in tables]),
            np.concatenate([t.col for t in tables]),
            np.concatenate([t.value for t in tables]),
            tables[-1].columns,
        )

    def published(self) -> LongTable:
        """The records the sinks write: without raw working columns (metrics named ``_...``)."""
        import numpy as np

        raw = np.array([c[2].startswith("_") for c in self.columns] + [False], dtype=bool)
        if not raw.any():
            return self
        keep = ~raw[self.col]
        return LongTable(self.step[keep], self.col[keep], self.value[keep], self.columns)
