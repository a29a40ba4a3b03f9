"""The step buffer on its own: columns, rows, writes, and what ``take`` hands back."""

from __future__ import annotations

import math

import numpy as np
import torch

from gradscope.buffer import StepBuffer

X, Y, Z = ("fc", "grad", "x"), ("fc", "grad", "y"), ("fc", "grad", "z")


def _buffer() -> StepBuffer:
    return StepBuffer(capacity=4)


def _cell(chunk, row: int, key: tuple[str, str, str]) -> tuple[float, bool]:
    col = chunk.columns.index(key)
    return float(chunk.values[row, col]), bool(chunk.written[row, col])


# -- columns and groups ----------------------------------------------------------------------------
def test_columns_and_groups_are_created_once():
    buf = _buffer()
    assert buf.column(*X) == 0
    assert buf.column(*Y) == 1
    assert buf.column(*X) == 0  # the same key: the same column
    xy = buf.group((X, Y))
    assert xy.cols == (0, 1)
    assert buf.group((X, Y)) is xy  # cached
    yz = buf.group((Y, Z))  # a new key gets the next column
    assert yz.cols == (1, 2)
    assert buf.group((Y, X)).cols == (1, 0)  # another order is another group
    assert buf.group((Y, X)) is not xy
    assert buf.columns == [X, Y, Z]


def test_full_counts_rows_against_the_capacity():
    buf = StepBuffer(capacity=2)
    assert not buf.full
    buf.open_row(0)
    assert not buf.full
    buf.open_row(1)
    assert buf.full


# -- writes ----------------------------------------------------------------------------------------
def test_writes_are_kept_as_tensors_until_take():
    buf = _buffer()
    xy = buf.group((X, Y))
    buf.open_row(5)
    values = torch.tensor([1.5, -2.0])
    buf.write(xy, values)
    values.mul_(10)  # the buffer holds the tensor itself (no copy per step): it sees this
    chunk = buf.take()
    assert chunk.steps.tolist() == [5]
    assert chunk.values.tolist() == [[15.0, -20.0]]
    assert chunk.written.tolist() == [[True, True]]
    assert chunk.columns == [X, Y]


def test_a_scalar_write_fills_a_one_column_group():
    buf = _buffer()
    x = buf.group((X,))
    buf.open_row(0)
    buf.write(x, torch.tensor(3.25))
    assert _cell(buf.take(), 0, X) == (3.25, True)


def test_a_group_written_again_in_a_row_replaces_the_earlier_write():
    buf = _buffer()
    xy = buf.group((X, Y))
    buf.open_row(0)
    buf.write(xy, torch.tensor([1.0, 2.0]))
    buf.write(xy, torch.tensor([3.0, 4.0]))
    buf.open_row(1)
    buf.write(xy, torch.tensor([5.0, 6.0]))
    chunk = buf.take()
    assert chunk.values.tolist() == [[3.0, 4.0], [5.0, 6.0]]


def test_a_column_written_by_two_groups_keeps_the_later_write():
    buf = _buffer()
    xy, yz = buf.group((X, Y)), buf.group((Y, Z))
    buf.open_row(0)
    buf.write(xy, torch.tensor([1.0, 2.0]))
    buf.write(yz, torch.tensor([3.0, 4.0]))  # y again: 3 wins
    buf.open_row(1)
    buf.write(yz, torch.tensor([5.0, 6.0]))
    buf.write(xy, torch.tensor([7.0, 8.0]))  # y again: 8 wins
    chunk = buf.take()
    assert chunk.values.tolist() == [[1.0, 3.0, 4.0], [7.0, 8.0, 6.0]]
    assert chunk.written.all()


def test_the_later_write_wins_across_precisions():
    # float64 and float32 values travel in separate transfers; the write order still decides
    buf = _buffer()
    x64, xy32 = buf.group((X,)), buf.group((X, Y))
    buf.open_row(0)
    buf.write(xy32, torch.tensor([1.0, 2.0]))
    buf.write(x64, torch.tensor(0.5, dtype=torch.float64))
    buf.open_row(1)
    buf.write(x64, torch.tensor(0.25, dtype=torch.float64))
    buf.write(xy32, torch.tensor([3.0, 4.0]))
    chunk = buf.take()
    assert chunk.values.tolist() == [[0.5, 2.0], [3.0, 4.0]]


def test_a_rewritten_group_wins_over_a_group_written_between():
    buf = _buffer()
    x, xy = buf.group((X,)), buf.group((X, Y))
    buf.open_row(0)
    buf.write(x, torch.tensor(1.0))  # e.g. a provisional read of x
    buf.write(xy, torch.tensor([2.0, 3.0]))
    buf.write(x, torch.tensor(4.0))  # x read again, last: the final value
    assert buf.take().values.tolist() == [[4.0, 3.0]]


def test_rewrites_hold_one_tensor_per_group():
    # e.g. many backward passes that never reach an optimizer step: the row does not grow
    buf = _buffer()
    x, xy = buf.group((X,)), buf.group((X, Y))
    row = buf.open_row(0)
    for i in range(1000):
        buf.write(x, torch.tensor(float(i)))
        buf.write(xy, torch.tensor([-1.0, float(i)]))
    assert list(row.writes) == [x, xy]
    assert buf.take().values.tolist() == [[-1.0, 999.0]]


def test_host_values_and_unwritten_cells():
    buf = _buffer()
    x = buf.group((X,))
    y, z = buf.column(*Y), buf.column(*Z)
    buf.open_row(0)
    buf.write(x, torch.tensor(1.0))
    buf.write_host(z, 7.0)
    buf.open_row(1)
    buf.write_host(y, 0.0)
    chunk = buf.take()
    assert chunk.written.tolist() == [[True, False, True], [False, True, False]]
    assert _cell(chunk, 0, Z) == (7.0, True)
    assert _cell(chunk, 1, Y) == (0.0, True)  # a zero written is a zero
    value, written = _cell(chunk, 0, Y)
    assert not written and math.isnan(value)


def test_a_nan_written_is_measured_not_missing():
    buf = _buffer()
    xy = buf.group((X, Y))
    buf.open_row(0)
    buf.write(xy, torch.tensor([float("nan"), float("inf")]))
    chunk = buf.take()
    value, written = _cell(chunk, 0, X)
    assert written and math.isnan(value)
    assert _cell(chunk, 0, Y) == (math.inf, True)


def test_vectors_come_back_behind_their_cell():
    buf = _buffer()
    x = buf.group((X,))
    y = buf.column(*Y)
    buf.open_row(0)
    buf.write(x, torch.tensor(1.0))
    buf.write_vector(y, torch.tensor([True, False, True]))  # a per-unit mask
    buf.open_row(1)
    buf.write_vector(y, torch.tensor([[0.5, 2.0]], dtype=torch.float64))
    buf.write(x, torch.tensor(9.0))
    chunk = buf.take()
    assert set(chunk.vectors) == {(0, y), (1, y)}
    assert chunk.vectors[(0, y)].tolist() == [1.0, 0.0, 1.0]
    assert chunk.vectors[(1, y)].tolist() == [0.5, 2.0]
    assert chunk.values[:, 0].tolist() == [1.0, 9.0]  # the vectors took no scalar's place


# -- precision -------------------------------------------------------------------------------------
def test_half_precision_values_come_back_as_their_float32_values():
    buf = _buffer()
    x, y = buf.group((X,)), buf.group((Y,))
    buf.open_row(0)
    buf.write(x, torch.tensor(0.1, dtype=torch.float16))
    buf.write(y, torch.tensor(0.1, dtype=torch.bfloat16))
    chunk = buf.take()
    # by hand: float16(0.1) = 1638/16384, bfloat16(0.1) = 205/2048 (both exact in float32)
    assert _cell(chunk, 0, X) == (1638 / 16384, True)
    assert _cell(chunk, 0, Y) == (205 / 2048, True)


def test_float32_values_are_float32_and_float64_values_keep_their_precision():
    buf = _buffer()
    x, y = buf.group((X,)), buf.group((Y,))
    buf.open_row(0)
    buf.write(x, torch.tensor(1 + 2**-40, dtype=torch.float64))
    buf.write(y, torch.tensor(0.1, dtype=torch.float32))
    chunk = buf.take()
    assert chunk.values.dtype == np.float64
    assert _cell(chunk, 0, X) == (1 + 2**-40, True)  # float32 would round it to 1.0
    assert _cell(chunk, 0, Y) == (float(np.float32(0.1)), True)


# -- take and forget -------------------------------------------------------------------------------
def _three_rows() -> tuple[StepBuffer, object]:
    buf = _buffer()
    x = buf.group((X,))
    for step in range(3):
        buf.open_row(step)
        buf.write(x, torch.tensor(float(10 * step)))
    return buf, x


def test_take_of_nothing_is_none():
    buf = _buffer()
    assert buf.take() is None
    buf.open_row(0)
    assert buf.take(keep_current=True) is None  # only the step in progress


def test_rows_stay_buffered_until_forget():
    buf, _ = _three_rows()
    first = buf.take()
    again = buf.take()  # the flush failed: nothing was forgotten, the same rows come back
    assert first.steps.tolist() == again.steps.tolist() == [0, 1, 2]
    assert again.values[:, 0].tolist() == [0.0, 10.0, 20.0]
    assert len(buf.rows) == 3
    buf.forget(again)
    assert buf.rows == [] and buf.take() is None


def test_take_keep_current_leaves_the_step_in_progress():
    buf, x = _three_rows()
    chunk = buf.take(keep_current=True)
    assert chunk.steps.tolist() == [0, 1]
    assert chunk.values[:, 0].tolist() == [0.0, 10.0]
    buf.forget(chunk)
    assert [r.step for r in buf.rows] == [2]
    buf.write(x, torch.tensor(25.0))  # step 2 goes on
    assert buf.take().values.tolist() == [[25.0]]


def test_forget_drops_only_the_rows_of_its_chunk():
    buf, x = _three_rows()
    chunk = buf.take()
    buf.open_row(3)  # opened while the chunk was being written
    buf.write(x, torch.tensor(30.0))
    buf.forget(chunk)
    rest = buf.take()
    assert rest.steps.tolist() == [3]
    assert rest.values.tolist() == [[30.0]]


def test_the_columns_of_a_chunk_are_those_known_at_take():
    buf, _ = _three_rows()
    chunk = buf.take()
    buf.column(*Y)  # a column added later does not change a chunk taken before
    assert chunk.columns == [X]
    assert chunk.values.shape == (3, 1)
    assert buf.take().values.shape == (3, 2)  # the next take is wider; y unwritten
    assert not buf.take().written[:, 1].any()


# -- reopen, discard, release ----------------------------------------------------------------------
def test_reopen_the_current_row():
    buf, _ = _three_rows()
    assert buf.reopen(2, drop_current=False)
    assert not buf.reopen(1, drop_current=False)  # not the current row: nothing changes
    assert [r.step for r in buf.rows] == [0, 1, 2]


def test_reopen_drops_the_newer_row():
    buf, x = _three_rows()
    assert buf.reopen(1, drop_current=True)
    assert [r.step for r in buf.rows] == [0, 1]
    buf.write(x, torch.tensor(15.0))  # writes go to step 1 again
    assert buf.take().values[:, 0].tolist() == [0.0, 15.0]


def test_reopen_refuses_a_row_that_is_gone():
    buf, _ = _three_rows()
    chunk = buf.take(keep_current=True)
    buf.forget(chunk)  # steps 0 and 1 were written out
    assert not buf.reopen(1, drop_current=True)
    assert [r.step for r in buf.rows] == [2]  # the current row is kept
    assert not buf.reopen(0, drop_current=False)
    empty = _buffer()
    assert not empty.reopen(0, drop_current=False)
    assert not empty.reopen(0, drop_current=True)


def test_discard_current_forgets_the_last_row_only():
    buf, _ = _three_rows()
    buf.discard_current()
    chunk = buf.take()
    assert chunk.steps.tolist() == [0, 1]
    assert chunk.values[:, 0].tolist() == [0.0, 10.0]
    empty = _buffer()
    empty.discard_current()  # nothing to discard: no error
    assert empty.rows == []


def test_release_drops_rows_and_groups_but_keeps_columns():
    buf, x = _three_rows()
    buf.release()
    assert buf.rows == [] and buf.take() is None
    assert buf.group((X,)) is not x  # groups are made afresh
    assert buf.group((X,)).cols == x.cols  # over the same columns
