"""Reading the metrics Parquet chunks of a run directory back: which files count
(:func:`chunk_files`), whether a chunk's columns fit the schema (:func:`schema_problem`), and
its valid rows (:func:`clean_chunk`, :func:`read_chunk`)."""

from __future__ import annotations

import fnmatch
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from . import rundir
from .records import LAYER_KINDS
from .schema import COLUMNS, MAX_STEP, _one_line, _Tally

if TYPE_CHECKING:
    import pyarrow as pa


def chunk_files(path: Path, problems: list[str]) -> list[Path]:
    """The run's Parquet chunks, in order (regular files only; temporary ones left out)."""
    metrics = path / rundir.METRICS
    try:
        st = metrics.stat()
    except FileNotFoundError:
        problems.append("metrics/ missing: no metrics recorded")
        return []
    except OSError as exc:
        problems.append(f"metrics/ unreadable ({exc.strerror or exc}): no metrics")
        return []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("metrics is not a folder: no metrics")
        return []
    try:
        candidates = sorted(
            metrics / n for n in os.listdir(metrics) if fnmatch.fnmatchcase(n, "part-*.parquet")
        )
    except OSError as exc:
        problems.append(f"metrics/ unreadable ({exc.strerror or exc}): no metrics")
        return []
    files = []
    tally = _Tally(problems, "metrics/")
    for f in candidates:
        try:
            regular = stat.S_ISREG(f.stat().st_mode)
        except OSError as exc:
            tally.add(f"{f.name} unreadable ({exc.strerror or exc}): its steps are missing")
            continue
        if regular:
            files.append(f)
        else:
            tally.add(f"{f.name} is not a regular file: ignored")
    tally.close()
    return files


def _is_text(t: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return bool(
        pa.types.is_string(t) or pa.types.is_large_string(t) or (is_view is not None and is_view(t))
    )


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a chunk with this Arrow schema cannot be read as metrics (None: it can)."""
    import pyarrow as pa

    names = schema.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        return f"no {', '.join(missing)} column (it has: {', '.join(map(str, names[:8]))})"
    twice = [c for c in COLUMNS if names.count(c) > 1]
    if twice:
        return f"column {twice[0]} appears twice"
    for col in ("step", "value"):
        t = schema.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            return f"column {col} holds {t}, expected numbers"
    for col in ("layer", "kind", "metric"):
        t = schema.field(col).type
        if not _is_text(t):
            return f"column {col} holds {t}, expected strings"
    return None


def clean_chunk(table: pa.Table, name: str, problems: list[str]) -> pa.Table | None:
    """The valid rows of a metrics chunk as (step int64, layer, kind, metric, value float64);
    None when its columns are wrong. Rows with a bad step (missing, negative, fractional,
    non-finite, beyond :data:`MAX_STEP`), a missing name or value, or an unknown kind are
    dropped, and counted in one problem line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    why = schema_problem(table.schema)
    if why is not None:
        problems.append(f"{name} unreadable ({why}): its steps are missing")
        return None
    extra = [c for c in table.column_names if c not in COLUMNS]
    table = table.select(list(COLUMNS))
    n = table.num_rows
    step = table.column("step")
    if pa.types.is_integer(step.type):
        raw = step.fill_null(-1).to_numpy() if step.null_count else step.to_numpy()
        ok = (raw >= 0) & (raw <= MAX_STEP)
    else:
        raw = pc.fill_null(step.cast(pa.float64()), math.nan).to_numpy()
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(raw) & (raw >= 0) & (raw <= MAX_STEP) & (np.floor(raw) == raw)
    bad_steps = n - int(ok.sum())
    kind_ok = pc.fill_null(pc.is_in(table.column("kind"), value_set=pa.array(LAYER_KINDS)), False)
    ok &= np.asarray(kind_ok.to_numpy(zero_copy_only=False), dtype=bool)
    for col in ("layer", "metric", "value"):
        if table.column(col).null_count:
            ok &= np.asarray(
                table.column(col).is_valid().to_numpy(zero_copy_only=False), dtype=bool
            )
    dropped = n - int(ok.sum())
    if dropped:
        kinds = dropped - bad_steps
        detail = ", ".join(
            x
            for x in (
                f"{bad_steps} with a step that is not a step number" if bad_steps else "",
                f"{kinds} with an unknown kind or a missing name or value" if kinds else "",
            )
            if x
        )
        problems.append(f"{name}: {dropped} of {n} rows dropped ({detail})")
        table = table.filter(pa.array(ok))
        raw = raw[ok]
    if extra:
        problems.append(f"{name}: extra column(s) ignored: {', '.join(map(str, extra[:8]))}")
    steps = pa.array(np.asarray(raw, dtype=np.int64), pa.int64())
    table = table.set_column(0, "step", steps)
    if table.column("value").type != pa.float64():
        table = table.set_column(4, "value", table.column("value").cast(pa.float64()))
    return table


def read_chunk(path: Path, problems: list[str]) -> pa.Table | None:
    """One Parquet chunk, read and cleaned (:func:`clean_chunk`); None when unreadable."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many kinds for a damaged file
        problems.append(
            f"{path.name} unreadable ({type(exc).__name__}: {_one_line(exc, 120)})"
            ": its steps are missing"
        )
        return None
    return clean_chunk(table, path.name, problems)
