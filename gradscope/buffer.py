"""The step buffer: statistics stay on the device until one transfer per flush.

Every recorded number is a *column* ``(layer, kind, metric)``; every step is a *row*. Probes hand
over whole groups of columns at once (all parameter norms of an optimizer step as one ``[k]``
tensor), and the buffer only remembers them: no device operation per step. A flush concatenates
every value of every buffered step with one ``torch.cat`` and copies the result to the host in
one transfer (per device), then scatters it into a ``[rows, columns]`` table on the host.

Measured on the reference MLP (benchmarks/): staging into a preallocated device matrix at every
step (``cat`` + ``index_copy_``) cost more host time than everything else gradscope does per
step, while holding a few small tensors per step until the flush costs nothing.

A value that was never written is not a value: each row remembers, on the host, which column
groups were written, so a NaN norm (a real finding) is never confused with "not measured". When
a step writes a column twice (a provisional read, then the final one), the later write wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np


_KEPT = (torch.float32, torch.float64)  # statistics in other dtypes travel as float32


class Group:
    """A fixed set of columns written together."""

    __slots__ = ("cols",)

    def __init__(self, cols: tuple[int, ...]) -> None:
        self.cols = cols


@dataclass
class Row:
    """One buffered step: the tensors written for it (on their device) and host-known values."""

    step: int
    # group -> its values, in write order: a group written again moves to the end
    writes: dict[Group, torch.Tensor] = field(default_factory=dict)
    host: dict[int, float] = field(default_factory=dict)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # column -> [n] values


@dataclass
class Chunk:
    """Rows copied to the host: ``values[r, c]`` is meaningful only where ``written[r, c]``."""

    steps: np.ndarray  # [rows] int64
    values: np.ndarray  # [rows, width] float64
    written: np.ndarray  # [rows, width] bool
    columns: list[tuple[str, str, str]]  # column -> (layer, kind, metric)
    # (row, column) -> the vector behind that cell (per-unit dead masks under torch.distributed,
    # reduced across ranks before the cell's value is derived from it)
    vectors: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list, repr=False)  # the buffer's rows it holds


class StepBuffer:
    """Per-step statistics, held as device tensors until :meth:`take`.

    Args:
        capacity: Rows held before a flush is due (``Config.flush_every``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.columns: list[tuple[str, str, str]] = []
        self._col_of: dict[tuple[str, str, str], int] = {}
        self._groups: dict[tuple[int, ...], Group] = {}
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

    def group_of(self, cols: tuple[int, ...]) -> Group:
        """The group for these column indices (created on first use; cached)."""
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
        """Record ``values`` (``[len(group.cols)]``, or a scalar for one column) for the current
        row. Nothing runs on the device: the tensor is kept until the flush. Writing a group
        again replaces the earlier values (a step that keeps accumulating, e.g. backward passes
        that never reach an optimizer step, holds one tensor per group, not one per pass) and
        takes the place of the latest write: over a column that another group wrote in between,
        the rewrite wins. (A dict re-insertion: O(1), no allocation per write.)"""
        writes = self.rows[-1].writes
        if group in writes:
            del writes[group]  # re-inserted below, at the end of the write order
        writes[group] = values

    def write_vector(self, col: int, values: torch.Tensor) -> None:
        """Record a 1-D statistic behind one cell (a per-unit mask whose count is the cell's
        value once the ranks' masks are combined); copied to the host with the rest."""
        self.rows[-1].vectors[col] = values

    def write_host(self, col: int, value: float) -> None:
        """Record a value the host already knows (a flag, a count), at no device cost."""
        self.rows[-1].host[col] = value

    def reopen(self, step: int, drop_current: bool) -> bool:
        """Make the row of ``step`` current again, if it has not been flushed yet.

        Args:
            drop_current: A newer row was opened since; forget it (it holds nothing that the
                reopened step does not take over).
        Returns:
            Whether ``step`` is the current row now.
        """
        rows = self.rows
        if drop_current:
            if len(rows) < 2 or rows[-2].step != step:
                return False
            rows.pop()
        return bool(rows) and rows[-1].step == step

    def discard_current(self) -> None:
        """Forget the current row (nothing of it was real)."""
        if self.rows:
            self.rows.pop()

    # -- flush --------------------------------------------------------------------------------
    def take(self, keep_current: bool = False) -> Chunk | None:
        """Copy the buffered rows to the host (one transfer per device and precision). The
        rows stay buffered until :meth:`forget` says they were written: a flush interrupted by
        a signal (or failing) loses nothing, and the next flush takes them again.

        Args:
            keep_current: The last row is a step still in progress: take only the rows before
                it.
        """
        import numpy as np

        rows = self.rows[:-1] if keep_current and self.rows else self.rows
        if not rows:
            return None
        width = len(self.columns)
        values = np.full((len(rows), width), np.nan)
        written = np.zeros((len(rows), width), dtype=bool)
        # Every written value, grouped by device and precision for the transfers: float64
        # statistics (of a float64 model) travel as float64, everything else as float32. Each
        # value keeps its (row, column) and its place in the write order.
        Key = tuple[torch.device, torch.dtype]
        groups: dict[Key, tuple[list[torch.Tensor], list[int], list[int], list[int]]] = {}
        n_written = 0
        for r, row in enumerate(rows):
            for grp, tensor in row.writes.items():  # statistics: detached already, never need grad
                flat = tensor if tensor.dim() == 1 else tensor.reshape(-1)
                if flat.dtype not in _KEPT:
                    flat = flat.float()
                tensors, row_idx, col_idx, seq = groups.setdefault(
                    (flat.device, flat.dtype), ([], [], [], [])
                )
                tensors.append(flat)
                row_idx.extend([r] * len(grp.cols))
                col_idx.extend(grp.cols)
                seq.extend(range(n_written, n_written + len(grp.cols)))
                n_written += len(grp.cols)
        vec_at: list[tuple[Key, int, int, int]] = []  # (device, dtype), row, col, length
        for r, row in enumerate(rows):
            for col, vec in row.vectors.items():
                flat = vec.reshape(-1).float()
                key = (flat.device, flat.dtype)
                groups.setdefault(key, ([], [], [], []))[0].append(flat)
                vec_at.append((key, r, col, flat.numel()))
        vectors: dict[tuple[int, int], np.ndarray] = {}
        parts: list[tuple[list[int], list[int], list[int], np.ndarray]] = []
        for key, (tensors, row_idx, col_idx, seq) in groups.items():
            host = torch.cat(tensors).to("cpu", torch.float64).numpy()  # the one transfer
            start = len(row_idx)
            for k, r, col, n in vec_at:
                if k == key:
                    vectors[(r, col)] = host[start : start + n]
                    start += n
            if row_idx:
                parts.append((row_idx, col_idx, seq, host[: len(row_idx)]))
        if parts:
            r_arr = np.concatenate([np.asarray(p[0]) for p in parts])
            c_arr = np.concatenate([np.asarray(p[1]) for p in parts])
            s_arr = np.concatenate([np.asarray(p[2]) for p in parts])
            host = np.concatenate([p[3] for p in parts])
            # a later write of the same (row, column) wins: keep each cell's last write
            in_order = np.argsort(s_arr, kind="stable")
            cell = (r_arr * max(width, 1) + c_arr)[in_order]
            _, last = np.unique(cell[::-1], return_index=True)
            keep = in_order[len(cell) - 1 - last]
            values[r_arr[keep], c_arr[keep]] = host[keep]
            written[r_arr[keep], c_arr[keep]] = True
        for r, row in enumerate(rows):
            for col, value in row.host.items():
                values[r, col] = value
                written[r, col] = True
        steps = np.array([row.step for row in rows], dtype=np.int64)
        return Chunk(steps, values, written, list(self.columns), vectors, list(rows))

    def forget(self, chunk: Chunk) -> None:
        """The rows of ``chunk`` (as :meth:`take` returned it) are safe elsewhere: drop them."""
        gone = {id(row) for row in chunk.rows}
        self.rows = [row for row in self.rows if id(row) not in gone]

    def release(self) -> None:
        self._groups.clear()
        self.rows.clear()
