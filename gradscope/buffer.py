"""The device-side step buffer: statistics stay on the device until one transfer per flush.

Every recorded number is a *column* ``(layer, kind, metric)``; every step is a *row*. Probes write
whole groups of columns at once (all parameter norms of an optimizer step in one ``index_copy_``)
into the current row of a preallocated ``[capacity, width]`` float32 tensor on the device of the
statistics. Nothing is read back until :meth:`StepBuffer.take`, which copies the filled rows to
the host in one transfer.

A value that was never written is not a value: each row remembers, on the host, which column
groups were written, so a NaN norm (a real finding) is never confused with "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np


class Group:
    """A fixed set of columns written together; caches its index tensor per device."""

    __slots__ = ("_index", "cols")

    def __init__(self, cols: tuple[int, ...]) -> None:
        self.cols = cols
        self._index: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        idx = self._index.get(device)
        if idx is None:
            idx = self._index[device] = torch.tensor(self.cols, dtype=torch.long, device=device)
        return idx


@dataclass
class Row:
    """Host-side bookkeeping for one buffered step."""

    step: int
    groups: list[Group] = field(default_factory=list)
    host: dict[int, float] = field(default_factory=dict)  # values known on the host (no sync)


@dataclass
class Chunk:
    """Rows copied to the host: ``values[r, c]`` is meaningful only where ``written[r, c]``."""

    steps: np.ndarray  # [rows] int64
    values: np.ndarray  # [rows, width] float64
    written: np.ndarray  # [rows, width] bool
    columns: list[tuple[str, str, str]]  # column -> (layer, kind, metric)

    def col(self, layer: str, kind: str, metric: str) -> int | None:
        try:
            return self.columns.index((layer, kind, metric))
        except ValueError:
            return None


class StepBuffer:
    """Preallocated ``[capacity, width]`` statistics on the device, flushed as a :class:`Chunk`.

    Args:
        capacity: Rows held before a flush is due (``Config.flush_every``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.columns: list[tuple[str, str, str]] = []
        self._col_of: dict[tuple[str, str, str], int] = {}
        self._groups: dict[tuple[int, ...], Group] = {}
        self._data: torch.Tensor | None = None  # [capacity, width] float32
        self.rows: list[Row] = []

    # -- columns ------------------------------------------------------------------------------
    def column(self, layer: str, kind: str, metric: str) -> int:
        key = (layer, kind, metric)
        col = self._col_of.get(key)
        if col is None:
            col = self._col_of[key] = len(self.columns)
            self.columns.append(key)
        return col

    def group(self, keys: tuple[tuple[str, str, str], ...]) -> Group:
        """The group for these columns (created on first use; cached)."""
        cols = tuple(self.column(*k) for k in keys)
        grp = self._groups.get(cols)
        if grp is None:
            grp = self._groups[cols] = Group(cols)
        return grp

    # -- rows ---------------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        return len(self.rows) >= self.capacity

    def open_row(self, step: int) -> Row:
        row = Row(step)
        self.rows.append(row)
        return row

    def write(self, group: Group, values: torch.Tensor) -> None:
        """Write ``values`` (shape ``[len(group.cols)]`` or a scalar for one column) into the
        current row, on the device. No host synchronisation."""
        row = self.rows[-1]
        data = self._storage(values.device, len(self.columns))
        data[len(self.rows) - 1].index_copy_(
            0, group.index(data.device), values.reshape(-1).to(torch.float32)
        )
        row.groups.append(group)

    def write_host(self, col: int, value: float) -> None:
        """Record a value the host already knows (a flag, a count), at no device cost."""
        self.rows[-1].host[col] = value

    def _storage(self, device: torch.device, width: int) -> torch.Tensor:
        data = self._data
        if data is not None and data.device == device and data.shape[1] >= width:
            return data
        # First write, a new column beyond the width, or the model moved to another device:
        # reallocate (rare: discovery time), keeping the rows written so far.
        new_width = max(width, 2 * (data.shape[1] if data is not None else 16))
        fresh = torch.full((self.capacity, new_width), float("nan"), device=device)
        if data is not None:
            fresh[:, : data.shape[1]].copy_(data.to(device))
        self._data = fresh
        return fresh

    # -- flush --------------------------------------------------------------------------------
    def take(self, keep_current: bool = False) -> Chunk | None:
        """Copy the buffered rows to the host (one transfer) and start empty again.

        Args:
            keep_current: The last row is a step still in progress: leave it buffered (moved to
                the first device row) and take only the rows before it.
        """
        import numpy as np

        rows = self.rows
        if keep_current and rows:
            rows, self.rows = rows[:-1], rows[-1:]
            if rows and self._data is not None:
                self._data[0].copy_(self._data[len(rows)])
        else:
            self.rows = []
        if not rows:
            return None
        width = len(self.columns)
        if self._data is not None:
            host = self._data[: len(rows), :width].to("cpu", torch.float64).numpy()
            values = np.array(host)  # own the memory; the device buffer is reused
            if values.shape[1] < width:
                values = np.pad(values, ((0, 0), (0, width - values.shape[1])), constant_values=np.nan)
        else:
            values = np.full((len(rows), width), np.nan)
        written = np.zeros((len(rows), width), dtype=bool)
        for r, row in enumerate(rows):
            for grp in row.groups:
                written[r, list(grp.cols)] = True
            for col, value in row.host.items():
                values[r, col] = value
                written[r, col] = True
        steps = np.array([row.step for row in rows], dtype=np.int64)
        return Chunk(steps, values, written, list(self.columns))

    def discard_current(self) -> None:
        """Forget the current row (nothing of it was real)."""
        if self.rows:
            self.rows.pop()

    def release(self) -> None:
        self._data = None
        self._groups.clear()
        self.rows.clear()
