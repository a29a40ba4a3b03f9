"""How long the HTML report takes, and how large it is, on a very large run.

Writes a synthetic run directory the way gradscope writes one (Parquet chunks of
``flush_every=100`` steps, the same schema, a run.json with the layers in forward order), then
times ``gradscope.report.write_report`` on it (wall and process CPU time, best of ``--repeat``)
and reports the file's size. The default run is the issue's worst case: 1,000 parameter tensors
x 100,000 steps (``grad_norm`` every step: 100 M records), with ``update_ratio`` and the
activations of 500 ReLU sites every 10th step, the loss and the total norm every step, and a NaN
burst. Targets: <= 15 s and <= 5 MB.

    python benchmarks/report.py                       # the full case (~1.3 GB of Parquet)
    python benchmarks/report.py --layers 200 --steps 20000 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import overhead  # noqa: E402

SECTION = "## HTML report: time and size on a large run (CPU)"
FLUSH = 100
SAMPLE = 10


def synthesize(root: Path, layers: int, steps: int, sites: int, seed: int = 0) -> Path:
    """A run directory with ``layers`` parameters and ``sites`` activation sites."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = root / "synthetic-run"
    (run / "metrics").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    params = [f"blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(layers)]
    acts = [f"blocks.{i}.act" for i in range(sites)]
    columns = (
        [(p, "param", "grad_norm") for p in params]
        + [(p, "param", "update_ratio") for p in params]
        + [(a, "module", "act_dead_fraction") for a in acts]
        + [("(run)", "run", "loss"), ("(run)", "run", "grad_norm_total")]
    )
    layer_dict = pa.array([c[0] for c in columns], pa.string())
    kind_dict = pa.array([c[1] for c in columns], pa.string())
    metric_dict = pa.array([c[2] for c in columns], pa.string())
    n_p, n_a = len(params), len(acts)
    scale = np.logspace(-4, 0, n_p)  # gradients vanish toward the input
    for start in range(0, steps, FLUSH):
        chunk_steps = np.arange(start, min(start + FLUSH, steps))
        step_col, col_col, val_col = [], [], []
        for s in chunk_steps:
            norms = scale * rng.lognormal(0.0, 0.3, n_p)
            if 60_000 <= s < 60_050:
                norms[: n_p // 3] = np.nan  # a NaN burst in the first third
            cols = [np.arange(n_p)]
            vals = [norms]
            if s % SAMPLE == 0:
                cols += [n_p + np.arange(n_p), 2 * n_p + np.arange(n_a)]
                vals += [
                    1e-3 * rng.lognormal(0.0, 0.5, n_p),
                    np.clip(rng.normal(0.1 + 0.6 * s / steps, 0.05, n_a), 0, 1),
                ]
            cols.append(np.array([2 * n_p + n_a, 2 * n_p + n_a + 1]))
            vals.append(np.array([2.0 * np.exp(-s / steps), float(np.sqrt(np.nansum(norms**2)))]))
            c = np.concatenate(cols)
            step_col.append(np.full(len(c), s))
            col_col.append(c)
            val_col.append(np.concatenate(vals))
        idx = pa.array(np.concatenate(col_col).astype(np.int32))
        table = pa.table(
            {
                "step": pa.array(np.concatenate(step_col).astype(np.int64)),
                "layer": pa.DictionaryArray.from_arrays(idx, layer_dict),
                "kind": pa.DictionaryArray.from_arrays(idx, kind_dict),
                "metric": pa.DictionaryArray.from_arrays(idx, metric_dict),
                "value": pa.array(np.concatenate(val_col)),
            }
        )
        pq.write_table(
            table, run / "metrics" / f"part-{start // FLUSH + 1:06d}.parquet", compression="snappy"
        )
    layers_meta = []
    for i in range(0, n_p, 2):
        block = f"blocks.{i // 2}"
        layers_meta.append({"name": block, "kind": "module", "type": "Linear"})
        layers_meta += [
            {"name": p, "kind": "param", "module": block, "type": "Linear"}
            for p in params[i : i + 2]
        ]
    meta = {
        "gradscope": "synthetic",
        "status": "completed",
        "steps": steps,
        "command": "benchmarks/report.py (synthetic)",
        "layers": layers_meta,
        "sites": acts,
        "models": {"": "Synthetic"},
        "exit_code": 0,
    }
    (run / "run.json").write_text(json.dumps(meta))
    (run / "events.jsonl").write_text(
        json.dumps({"event": "remedy", "remedy": "clip", "action": "clipped", "step": 60_000})
        + "\n"
    )
    (run / "findings.json").write_text("[]")
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--keep", type=Path, help="synthesize here and keep it")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    from gradscope.report import write_report

    root = args.keep or Path(tempfile.mkdtemp(prefix="gs-bench-report-"))
    try:
        t0 = time.perf_counter()
        run = synthesize(root, args.layers, args.steps, args.sites)
        made = time.perf_counter() - t0
        parquet_mb = sum(f.stat().st_size for f in (run / "metrics").iterdir()) / 1e6
        print(
            f"synthesized {args.layers} layers x {args.steps} steps in {made:.0f} s "
            f"({parquet_mb:.0f} MB of Parquet)",
            flush=True,
        )
        walls, cpus = [], []
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            path = write_report(run)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            print(f"  report in {walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU", flush=True)
        size = path.stat().st_size / 1e6
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    records = args.steps * (args.layers + 2) + (args.steps // SAMPLE) * (args.layers + args.sites)
    section = (
        "\n".join(
            [
                SECTION,
                "",
                f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}, `python benchmarks/report.py"
                f"{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`; "
                f"{overhead.cpu_model()} ({os.cpu_count()} cores), load average "
                f"{os.getloadavg()[0]:.2f}.",
                "",
                "A synthetic run written as gradscope writes one: "
                f"{args.layers:,} parameter tensors x {args.steps:,} steps, `grad_norm` every "
                f"step, `update_ratio` and `act_dead_fraction` of {args.sites} sites every "
                f"{SAMPLE}th step, loss and total norm every step: {records / 1e6:.0f} M records "
                f"in {args.steps // FLUSH:,} Parquet chunks ({parquet_mb:.0f} MB). "
                "`write_report` reads the chunks one at a time and "
                "reduces them to 400 step bins on the way (see gradscope/report/data.py).",
                "",
                "| report | best wall time | best CPU time | size | targets |",
                "|---|---|---|---|---|",
                f"| report.html | {min(walls):.2f} s | {min(cpus):.2f} s | {size:.2f} MB | "
                f"≤ 15 s, ≤ 5 MB: {'met' if min(walls) <= 15 and size <= 5 else '**not met**'} |",
            ]
        )
        + "\n"
    )
    print("\n" + section)
    if not args.quick:
        overhead.replace_section(args.out, section)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
