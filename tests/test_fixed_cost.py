"""What a short run costs beyond its training (benchmarks/startup.py): the Parquet chunks are
written without pandas, the report's heatmaps without matplotlib. Each keeps the output as it
was: the same Parquet bytes, the same pixels."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys

import numpy as np
import pytest

import gradscope
from gradscope.records import LongTable
from gradscope.report import figures
from gradscope.sinks.store import arrow_table


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
    now = arrow_table(t)
    assert now.schema == before.schema
    a, b = io.BytesIO(), io.BytesIO()
    pq.write_table(now, a, compression="snappy")
    pq.write_table(before, b, compression="snappy")
    assert a.getvalue() == b.getvalue()  # NaN != NaN: the bytes say "equal"
    # strided arrays (a view of a flush's buffer) too
    wide = LongTable(np.repeat(t.step, 2)[::2], np.repeat(t.col, 2)[::2], t.value, t.columns)
    c = io.BytesIO()
    pq.write_table(arrow_table(wide), c, compression="snappy")
    assert c.getvalue() == b.getvalue()


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
