"""What a short run costs beyond its training (benchmarks/startup.py): the Parquet chunks are
written without pandas, the report's heatmaps without matplotlib, and the report at close is
built from the records the store kept in memory, not read back from disk. Each keeps the
output as it was: the same Arrow tables in the chunks, the same pixels, the same report."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_report import _train as train_watched
from torch import nn

import gradscope
from gradscope import rundir
from gradscope.records import LongTable
from gradscope.report import data as report_data
from gradscope.report import figures, write_report
from gradscope.report.data import read_report_data
from gradscope.sinks.store import Store, arrow_table


def _table() -> LongTable:
    columns = [
        ("fc1.weight", "param", "grad_norm"),
        ("fc1", "module", "act_dead_fraction"),
        ("(run)", "run", "loss"),
        ("é漢<x>", "param", "grad_norm"),  # a ModuleDict key can be any text
    ]
    step = np.array([0, 0, 0, 1, 1, 2, 3, 3], dtype=np.int64)
    col = np.array([0, 1, 2, 0, 3, 2, 1, 3], dtype=np.int64)
    value = np.array([1.0, np.nan, np.inf, -0.0, 1e-300, -np.inf, 3.5, 0.25])
    return LongTable(step, col, value, columns)


def _same_table(a, b) -> None:
    """Equal tables, the values bit for bit (NaN != NaN for ``Table.equals``)."""
    assert a.schema == b.schema
    names = [c for c in a.column_names if c != "value"]
    assert a.select(names).equals(b.select(names))
    bits = [t.column("value").to_numpy().view(np.int64) for t in (a, b)]
    assert np.array_equal(*bits)
    assert a.column("value").null_count == b.column("value").null_count == 0


def test_a_chunk_is_the_arrow_table_pa_array_builds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = _table()
    idx = pa.array(t.col, pa.int32())

    def names(i: int) -> pa.Array:
        return pa.DictionaryArray.from_arrays(idx, pa.array([c[i] for c in t.columns], pa.string()))

    before = pa.table(  # how Store.write built it before
        {
            "step": pa.array(t.step, pa.int64()),
            "layer": names(0),
            "kind": names(1),
            "metric": names(2),
            "value": pa.array(t.value, pa.float64()),
        }
    )
    _same_table(arrow_table(t), before)
    # strided arrays (a view of a flush's buffer) too
    wide = LongTable(np.repeat(t.step, 2)[::2], np.repeat(t.col, 2)[::2], t.value, t.columns)
    _same_table(arrow_table(wide), before)
    # and in a Parquet file (its bytes are not reproducible: pyarrow leaves padding bits as
    # they were in memory, for either table)
    pq.write_table(arrow_table(t), tmp_path / "now.parquet", compression="snappy")
    pq.write_table(before, tmp_path / "before.parquet", compression="snappy")
    _same_table(pq.read_table(tmp_path / "now.parquet"), pq.read_table(tmp_path / "before.parquet"))


def test_writing_a_chunk_does_not_import_pandas(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from gradscope import rundir\n"
        "from gradscope.records import LongTable\n"
        "from gradscope.sinks.store import Store\n"
        "store = Store(rundir.create(Path(sys.argv[1]), 'r'))\n"
        "store.write(LongTable(np.arange(3), np.zeros(3, dtype=np.int64), np.ones(3),\n"
        "                      [('a', 'param', 'grad_norm')]))\n"
        "print('pandas' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "False"
    run = gradscope.load_run(tmp_path / "r")
    assert run.metrics["value"].tolist() == [1.0, 1.0, 1.0]


def test_the_store_keeps_what_it_wrote_up_to_its_limit(tmp_path):
    table = _table()
    store = Store(rundir.create(tmp_path, "r"), keep=12)
    try:
        store.write(table)
        assert store.written is not None
        ((name, size, kept),) = store.written
        assert name == "part-000001.parquet"
        assert size == (tmp_path / "r" / rundir.METRICS / name).stat().st_size
        # the flush's own arrays, no copy; the column list copied (the buffer's grows)
        assert kept.step is table.step and kept.value is table.value
        assert kept.columns == table.columns and kept.columns is not table.columns
        store.write(table)  # 16 records > 12: the report reads the chunks instead
        assert store.written is None
    finally:
        store.close()
    store = Store(rundir.create(tmp_path, "r"), keep=0)  # report=False keeps nothing
    try:
        store.write(table)
        assert store.written is None
    finally:
        store.close()
    store = Store(rundir.create(tmp_path, "r"))
    store.write(table)
    assert store.written is not None
    store.close()  # the report took them before
    assert store.written is None


def test_keeping_a_chunk_in_memory_never_fails_its_write(tmp_path, monkeypatch):
    import gradscope.sinks.store as store_module

    def broken(*args):
        raise RuntimeError("a bug in the bookkeeping")

    store = Store(rundir.create(tmp_path, "r"))
    monkeypatch.setattr(store_module, "LongTable", broken)
    try:
        store.write(_table())  # no exception: the chunk is on disk, memory is given up
        assert store.written is None
    finally:
        store.close()
    assert len(gradscope.load_run(tmp_path / "r").metrics) == len(_table())


@pytest.mark.parametrize("name", ["viridis", "Reds", "Oranges"])
def test_the_report_colormaps_are_matplotlibs(name):
    import matplotlib

    cmap = matplotlib.colormaps[name]
    assert cmap.N == 256
    expected = (cmap(np.arange(256))[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(figures._lut(name), expected)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        out.append((png[i + 4 : i + 8], png[i + 8 : i + 8 + n]))
        i += 12 + n
    return out


@pytest.mark.parametrize("name", ["viridis", "Reds", "Oranges", "magma"])
def test_a_heatmap_png_is_the_one_matplotlib_wrote(name):
    """The pixels as matplotlib's colormap and ``imsave`` made them before: the same PNG, less
    the "Software: Matplotlib" text chunk. ``magma`` is not kept: it comes from matplotlib."""
    import matplotlib
    from matplotlib import image as mpimg

    rng = np.random.default_rng(0)
    values = rng.normal(size=(37, 123)) * 3
    values[rng.random(values.shape) < 0.05] = np.nan
    values[0, :3] = [np.inf, -np.inf, 1.0]
    values[1] = np.linspace(-1, 1, 257)[:123]  # every bin edge: x * 256 is exact there
    bad = rng.random(values.shape) < 0.03
    lo, hi = -1.0, 1.0

    norm = np.clip((values - lo) / (hi - lo), 0.0, 1.0)  # how colorize() did it before
    rgb = matplotlib.colormaps[name](np.nan_to_num(norm))[..., :3]
    rgb[np.isnan(values)] = figures.NAN_RGB
    rgb[bad] = figures.BAD_RGB
    buf = io.BytesIO()
    mpimg.imsave(buf, np.ascontiguousarray(rgb), format="png")
    before = [c for c in _chunks(buf.getvalue()) if c[0] != b"tEXt"]

    uri = figures.png_data_uri(figures.colorize(values, bad, name, lo, hi))
    now = _chunks(base64.b64decode(uri.split(",", 1)[1]))
    assert [c[0] for c in now] == [b"IHDR", b"pHYs", b"IDAT", b"IEND"]
    assert now == before


def _train(out, steps: int, nan_at: int | None = None, **options):
    """Several flushes (every 10 steps), activations every step, a tanh to saturate."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    return train_watched(
        model, steps, out, nan_at, scale=4.0, flush_every=10, activation_every=1, **options
    )


@pytest.fixture
def reads(monkeypatch):
    """The times a report read the Parquet chunks back from disk."""
    calls: list[object] = []
    real = report_data._read_chunks

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(report_data, "_read_chunks", spy)
    return calls


@pytest.fixture
def kept(monkeypatch):
    """What each report at close was given of the store's memory."""
    import gradscope.scope

    given: list[object] = []
    real = gradscope.scope.write_report_safely

    def spy(run_dir, quiet, written=None):
        given.append(written)
        return real(run_dir, quiet, written)

    monkeypatch.setattr(gradscope.scope, "write_report_safely", spy)
    return given


def _same_data(a, b) -> None:
    assert (a.last_step, a.width, a.cols, a.records) == (b.last_step, b.width, b.cols, b.records)
    assert a.problems == b.problems and a.progress == b.progress
    assert a.meta == b.meta and a.events == b.events and a.findings == b.findings
    assert set(a.acc) == set(b.acc)
    for metric in a.acc:
        names_a, idx_a = a.ordered(metric)
        names_b, idx_b = b.ordered(metric)
        assert names_a == names_b, metric
        for field in ("count", "sum", "logsum", "logcount", "max", "bad"):
            x = getattr(a.acc[metric], field)[idx_a]
            y = getattr(b.acc[metric], field)[idx_b]
            assert np.array_equal(x, y, equal_nan=True), (metric, field)


@pytest.mark.parametrize("nan_at", [None, 17])
def test_the_report_at_close_comes_from_memory_and_equals_the_one_from_disk(
    out, reads, kept, nan_at
):
    run_dir = _train(out, 35, nan_at)
    assert reads == []  # nothing read back at close
    (written,) = kept
    assert written is not None and [n for n, _, _ in written] == [
        f"part-{i:06d}.parquet" for i in range(1, 5)
    ]
    _same_data(read_report_data(run_dir, written=written), read_report_data(run_dir))
    at_close = (run_dir / "report.html").read_text(encoding="utf-8")
    again = write_report(run_dir, run_dir / "again.html").read_text(encoding="utf-8")
    assert again == at_close
    if nan_at is not None:
        assert "NaN/Inf at step 17" in at_close


def test_the_report_reads_the_disk_when_memory_is_not_what_it_holds(out, reads, kept):
    run_dir = _train(out, 25)
    (written,) = kept
    assert written is not None and reads == []
    from_disk = read_report_data(run_dir)
    assert len(reads) == 1
    # another size, a missing chunk, a chunk the store never wrote, rows the disk drops
    name, size, table = written[0]
    bad_step = LongTable(table.step - 1, table.col, table.value, table.columns)
    bad_kind = LongTable(table.step, table.col, table.value, [("x", "?", "grad_norm")] * 99)
    for other in (
        [(name, size + 1, table), *written[1:]],
        written[1:],
        [*written, ("part-000009.parquet", 1, table)],
        [(name, size, bad_step), *written[1:]],
        [(name, size, bad_kind), *written[1:]],
    ):
        _same_data(read_report_data(run_dir, written=other), from_disk)
    assert len(reads) == 6
    (run_dir / "metrics" / name).unlink()  # the disk changed: what the report says follows it
    data = read_report_data(run_dir, written=written)
    assert len(reads) == 7 and data.records < from_disk.records


def test_a_run_over_the_memory_limit_has_its_report_read_from_disk(out, reads, kept, monkeypatch):
    monkeypatch.setattr("gradscope.sinks.store.KEEP_RECORDS", 100)
    run_dir = _train(out, 25)
    assert kept == [None] and len(reads) == 1
    assert "Gradient flow" in (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_short_run_loads_neither_pandas_nor_matplotlib(tmp_path):
    code = (
        "import sys, torch, gradscope\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "with gradscope.watch(model, out=sys.argv[1], quiet=True) as scope:\n"
        "    for _ in range(2):\n"
        "        opt.zero_grad()\n"
        "        model(torch.randn(4, 4)).sum().backward()\n"
        "        opt.step()\n"
        "assert (scope.run_dir / 'report.html').is_file()\n"
        f"assert any((scope.run_dir / {rundir.TB!r}).iterdir())\n"
        "print(','.join(m for m in ('pandas', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
