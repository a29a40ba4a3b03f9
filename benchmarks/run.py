"""What `gradscope run` costs compared with `python` and with `gradscope.watch` in the script.

Each round runs benchmarks/run_target.py three ways, in a shuffled order, each in its own
process: ``python run_target.py`` (plain), ``python run_target.py --watch`` (the script calls
``gradscope.watch``) and ``python -m gradscope run --quiet run_target.py`` (nothing in the script
changed). The script reports the process CPU time of its timed steps only, after 110 warm-up
steps (past gradscope's first flush, which imports pandas and pyarrow), so interpreter start-up
and first-use imports are not counted. Ratios are paired per round, medians with p25-p75. The
difference between ``run`` and ``watch`` is what attaching without code costs: the global
forward pre-hook that finds models (it fires on every module call in the process) and the
wrappers around ``clip_grad_norm_``/``torch.save``.

Also checks that the three ways end with bit-identical weights (a checksum of the parameters).

    python benchmarks/run.py              # writes its section of benchmarks/RESULTS.md
    python benchmarks/run.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import overhead  # noqa: E402

SECTION = "## `gradscope run`: attaching without code (CPU)"
TARGET = HERE / "run_target.py"
VARIANTS = ("plain", "watch", "run")
WORKLOADS = {"lstmcell": 100, "mlp": 200}  # steps timed per process


def command(variant: str, workload: str, steps: int, out: str) -> list[str]:
    script = [str(TARGET), "--workload", workload, "--steps", str(steps)]
    if steps < 100:  # --quick
        script += ["--warmup", "10"]
    if variant == "plain":
        return [sys.executable, *script]
    if variant == "watch":
        return [sys.executable, *script, "--watch"]
    return [sys.executable, "-m", "gradscope", "run", "--quiet", "--out", out, *script]


def once(variant: str, workload: str, steps: int, out: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command(variant, workload, steps, out), capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant}/{workload} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def measure(workload: str, rounds: int, steps: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    checksums: dict[str, set[float]] = {v: set() for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="gs-bench-run-") as out:
        for r in range(rounds):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                res = once(variant, workload, steps, out)
                cpu[variant].append(res["cpu"])
                checksums[variant].add(res["checksum"])
            print(f"  {workload} round {r + 1}/{rounds}", flush=True)
    return {
        "steps": steps,
        "rounds": rounds,
        "block_seconds": cpu,
        "ms_per_step": {v: 1000 * statistics.median(t) / steps for v, t in cpu.items()},
        "watch_vs_plain": overhead.paired(cpu["watch"], cpu["plain"]),
        "run_vs_plain": overhead.paired(cpu["run"], cpu["plain"]),
        "run_vs_watch": overhead.paired(cpu["run"], cpu["watch"]),
        "same_weights": len(set().union(*checksums.values())) == 1,
    }


def fmt(s: dict[str, float]) -> str:
    return f"{s['ratio']:.3f}× ({s['ratio_p25']:.3f}–{s['ratio_p75']:.3f})"


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        SECTION,
        "",
        f"{meta['date']}, `{meta['command']}`; torch {meta['torch']}, Python {meta['python']}, "
        f"{meta['cpu']} ({meta['cpu_count']} cores), one torch thread, load average "
        f"{meta['loadavg_start'][0]:.2f} → {meta['loadavg_end'][0]:.2f}."
        + (" **Quick smoke run: not a measurement.**" if meta["quick"] else ""),
        "",
        "Each variant runs in its own process (benchmarks/run_target.py); the CPU time of the "
        "timed steps only (after 110 warm-up steps, past the first flush and its one-time "
        "imports), medians over rounds, ratios paired per round (p25–p75). `plain`: "
        "`python run_target.py`; `watch`: the script calls `gradscope.watch(model)` (defaults, "
        "TensorBoard on); `run`: `gradscope run --quiet run_target.py`, the unchanged script. "
        "`lstmcell` calls an `nn.LSTMCell` 64 times per step (~130 module calls per step), "
        "the per-call worst case; `mlp` is benchmarks/overhead.py's MLP.",
        "",
        "| workload | steps × rounds | plain ms/step | watch ms/step | run ms/step | watch × plain "
        "| run × plain | run × watch | same weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        ms = res["ms_per_step"]
        lines.append(
            f"| {name} | {res['steps']} × {res['rounds']} | {ms['plain']:.2f} | "
            f"{ms['watch']:.2f} | {ms['run']:.2f} | {fmt(res['watch_vs_plain'])} | "
            f"{fmt(res['run_vs_plain'])} | {fmt(res['run_vs_watch'])} | "
            f"{'yes' if res['same_weights'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 10 steps (and 10 warm-up steps)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "run.json")
    args = parser.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names or args.rounds < 1:
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}; --rounds >= 1")
    rounds = 2 if args.quick else args.rounds
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "cpu": overhead.cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        **_versions(),
    }
    results = {n: measure(n, rounds, 10 if args.quick else WORKLOADS[n], 0) for n in names}
    meta["loadavg_end"] = os.getloadavg()
    section = render(meta, results)
    overhead.publish(section, args.out, args.json, {"meta": meta, "workloads": results})


def _versions() -> dict[str, str]:
    import platform

    import torch

    import gradscope

    return {
        "torch": torch.__version__,
        "gradscope": gradscope.__version__,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
