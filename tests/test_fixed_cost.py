"""What a short run costs beyond its training (benchmarks/startup.py): the Parquet chunks are
written without pandas (the same bytes as before)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

import gradscope
from gradscope.records import LongTable
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
