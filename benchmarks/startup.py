"""The fixed cost of a short run: what `gradscope run` and `gradscope.watch` add to the whole
process of a 2-step script (interpreter start-up, imports, attaching, closing, the report), in
CPU seconds, and where it goes.

A separate script, not a mode of benchmarks/run.py: run.py times the steps of a long run after
a warm-up (the per-step cost, start-up excluded); this one times whole processes that are almost
nothing but start-up and close.

Each round runs benchmarks/run_target.py (``--workload tiny --steps 2 --warmup 0``: a 32-64-10
MLP, batch 16) as ``python run_target.py`` (plain), ``python -m gradscope run --quiet
run_target.py`` (run) and ``python run_target.py --watch`` (the script calls
``gradscope.watch(..., quiet=True)`` and ``close()``), in a shuffled order, each in its own
process; a process's CPU time is the user + system time of the child
(``resource.getrusage(RUSAGE_CHILDREN)`` before and after). With ``--before REV`` the gradscope
package of commit REV (``git archive``) runs beside the working tree's, in the same rounds.

Then, for the breakdown, each variant runs once more per round (``--probe-rounds``) under this
script's ``--probe`` mode: it runs the same command in-process and records the CPU time of every
import (per module, less the imports it triggered: thread CPU time) and of gradscope's stages
(``Scope.__init__``; in ``Scope.close``: the last flush with its Parquet write and TensorBoard,
and ``write_report_safely``), less the imports inside them, and the garbage collector's passes
(``gc.callbacks``) apart, wherever they fall. Imports are counted for the modules that plain
``python run_target.py`` never loads, each under the outermost such non-gradscope package that
loaded it (PIL loaded by matplotlib counts as matplotlib).

Bytecode: this VM sets PYTHONDONTWRITEBYTECODE=1, so every process would compile gradscope from
source; an installed package has its .pyc files, so the children run without it (the first,
untimed round writes them).

    python benchmarks/startup.py --before b446cd9   # writes its section of RESULTS.md
    python benchmarks/startup.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "## Fixed cost of a short run (CPU)"
TARGET = HERE / "run_target.py"
SCRIPT = [str(TARGET), "--workload", "tiny", "--steps", "2", "--warmup", "0"]
# (stage, module, qualified name): the stages the probe times, where the function exists
STAGES = (
    ("attach", "gradscope.scope", "Scope.__init__"),
    ("close", "gradscope.scope", "Scope.close"),
    ("flush", "gradscope.flusher", "Flusher.flush"),
    ("parquet", "gradscope.sinks.store", "Store.write"),
    ("tensorboard", "gradscope.sinks.tensorboard", "TensorBoardSink.write"),
    ("tensorboard", "gradscope.sinks.tensorboard", "TensorBoardSink.close"),
    ("report", "gradscope.meta", "write_report_safely"),
)
# what the breakdown shows: (row, how it is computed from a probe's stage totals, exclusive of
# imports); "close, the rest": findings.json, run.json, closing the sinks, the summary
ROWS: tuple[tuple[str, Callable[[dict[str, float]], float]], ...] = (
    ("attach (`Scope.__init__`)", lambda s: s.get("attach", 0.0)),
    ("close: Parquet write", lambda s: s.get("parquet", 0.0)),
    ("close: TensorBoard", lambda s: s.get("tensorboard", 0.0)),
    (
        "close: last flush, the rest (to host, rules)",
        lambda s: s.get("flush", 0.0) - s.get("parquet", 0.0) - s.get("tensorboard", 0.0),
    ),
    ("close: report", lambda s: s.get("report", 0.0)),
    (
        "close: the rest (findings, run.json)",
        lambda s: s.get("close", 0.0) - s.get("flush", 0.0) - s.get("report", 0.0),
    ),
)
GC_ROW = "garbage collection (more than python's)"
SUM_ROW = "**the parts above**"
IMPORT_GROUPS = ("matplotlib", "pandas", "pyarrow", "jinja2", "tensorboard", "PIL", "gradscope")


# -- the probe (a child process) ------------------------------------------------------------------
def probe(out: str, argv: list[str]) -> None:
    """Run ``python argv...`` in this process, timing imports and gradscope's stages; write
    what was measured to ``out`` (JSON) at the end, however the command ended."""
    import gc
    import importlib._bootstrap as bootstrap  # type: ignore[import-not-found]
    import runpy
    import threading

    local = threading.local()
    imports: dict[str, list[Any]] = {}  # module -> [self CPU, root package, stage]
    stages: dict[str, float] = {}  # stage -> CPU, imports inside excluded
    apart: dict[str, float] = {}  # stage -> CPU of the imports and collections inside
    active: list[str] = []  # stages entered (main thread), outermost first
    collected = [0.0]  # CPU of the garbage collector's passes
    load = bootstrap._load_unlocked

    def stack() -> list[list[Any]]:
        if not hasattr(local, "stack"):
            local.stack = []
        return local.stack  # type: ignore[no-any-return]

    def timed_load(spec: Any) -> Any:
        frames = stack()
        outer = next((f[1] for f in frames if f[1] != "gradscope"), None)
        root = outer or spec.name.split(".")[0]
        frame = [spec.name, root, 0.0]  # name, root, CPU of nested imports
        frames.append(frame)
        start = time.thread_time()
        try:
            return load(spec)
        finally:
            spent = time.thread_time() - start
            frames.pop()
            if frames:
                frames[-1][2] += spent
            own = spent - frame[2]
            imports[spec.name] = [own, root, active[-1] if active else ""]
            if not frames and active:
                for name in active:
                    apart[name] = apart.get(name, 0.0) + spent
            _patch(spec.name)

    bootstrap._load_unlocked = timed_load

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        """A collection's CPU is the collector's, not that of the import or stage it fell in
        (a full pass over torch's objects takes ~0.1 s, wherever the allocations tip it)."""
        if phase == "start":
            local.gc_start = time.thread_time()
            return
        spent = time.thread_time() - getattr(local, "gc_start", time.thread_time())
        collected[0] += spent
        frames = stack()
        if frames:
            frames[-1][2] += spent
        elif threading.current_thread() is threading.main_thread():
            for name in active:
                apart[name] = apart.get(name, 0.0) + spent

    gc.callbacks.append(on_gc)

    def wrap(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread() or stage in active:
                return fn(*args, **kwargs)
            active.append(stage)
            before = apart.get(stage, 0.0)
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                active.pop()
                inner = apart.get(stage, 0.0) - before
                stages[stage] = stages.get(stage, 0.0) + spent - inner

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def _patch(module: str) -> None:
        mod = sys.modules.get(module)
        for stage, where, qualname in STAGES:
            if where != module or mod is None:
                continue
            owner: Any = mod
            *path, attr = qualname.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            fn = getattr(owner, attr, None) if owner is not None else None
            if fn is not None:
                setattr(owner, attr, wrap(stage, fn))

    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()  # as python -m does
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        bootstrap._load_unlocked = load
        gc.callbacks.remove(on_gc)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        gs = sys.modules.get("gradscope")
        Path(out).write_text(
            json.dumps(
                {
                    "cpu": usage.ru_utime + usage.ru_stime,
                    "imports": imports,
                    "modules": sorted(sys.modules),
                    "stages": stages,
                    "apart": apart,
                    "gc": collected[0],
                    "gradscope": getattr(gs, "__file__", None),
                }
            )
        )
    sys.exit(code)


# -- the parent -----------------------------------------------------------------------------------
def command(variant: str, out: str) -> list[str]:
    if variant == "plain":
        return [*SCRIPT]
    if variant.startswith("watch"):
        return [*SCRIPT, "--watch", "--out", out]
    return ["-m", "gradscope", "run", "--quiet", "--out", out, *SCRIPT]


def environment(tree: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["OMP_NUM_THREADS"] = "1"
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        )
    return env


def once(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """The CPU seconds (user + system) of one child process. ``cwd``: a folder without a
    gradscope package (``python -m gradscope`` looks in the working directory first)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def probed(argv: list[str], env: dict[str, str], where: str) -> dict[str, Any]:
    out = os.path.join(where, "probe.json")
    total = once([str(Path(__file__).resolve()), "--probe", out, "--", *argv], env, where)
    res = dict(json.loads(Path(out).read_text()))
    res["exit"] = total - res["cpu"]  # the interpreter's exit, after the command
    return res


def extract(rev: str, where: Path) -> Path:
    """The gradscope package of commit ``rev``, unpacked under ``where``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "gradscope"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def breakdown(probe_run: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """A probe's figures: each row of ROWS, and the imports of modules plain never loads, by
    group."""
    base = set(plain["modules"])
    out = {row: max(0.0, fn(probe_run["stages"])) for row, fn in ROWS}
    groups = dict.fromkeys(IMPORT_GROUPS, 0.0)
    groups["other"] = 0.0
    for name, (own, root, _) in probe_run["imports"].items():
        if name in base:
            continue
        group = root if root in groups else "other"
        groups[group] += own
    out["imports"] = sum(groups.values())
    out.update({f"imports: {g}": v for g, v in groups.items()})
    out[GC_ROW] = probe_run["gc"] - plain["gc"]
    out[SUM_ROW] = out["imports"] + sum(out[row] for row, _ in ROWS) + out[GC_ROW]
    return out


def q(values: list[float]) -> tuple[float, float, float]:
    """Median, p25 and p75."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    qs = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), qs[0], qs[2]


def measure(
    trees: dict[str, Path | None], rounds: int, probe_rounds: int, seed: int
) -> dict[str, Any]:
    variants = ["plain"] + [f"{kind}:{label}" for label in trees for kind in ("run", "watch")]
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    parts: dict[str, list[dict[str, float]]] = {v: [] for v in variants if v != "plain"}
    where: dict[str, str] = {}
    plain_gc: list[float] = []
    plain_exit: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-startup-") as tmp:
        out = os.path.join(tmp, "runs")

        def env_of(variant: str) -> dict[str, str]:
            return environment(None if variant == "plain" else trees[variant.split(":")[1]])

        for variant in variants:  # untimed: writes the .pyc files, warms the page cache
            once(command(variant, out), env_of(variant), tmp)
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for variant in order:
                cpu[variant].append(once(command(variant, out), env_of(variant), tmp))
            print(f"  round {r + 1}/{rounds}", flush=True)
        for r in range(probe_rounds):
            plain = probed(command("plain", out), env_of("plain"), tmp)
            plain_gc.append(plain["gc"])
            plain_exit.append(plain["exit"])
            order = [v for v in variants if v != "plain"]
            rng.shuffle(order)
            for variant in order:
                res = probed(command(variant, out), env_of(variant), tmp)
                where[variant] = str(res["gradscope"])
                tree = trees[variant.split(":")[1]]
                if tree is not None and not where[variant].startswith(str(tree) + os.sep):
                    raise SystemExit(f"{variant} ran the gradscope of {where[variant]}, not {tree}")
                parts[variant].append(breakdown(res, plain))
            print(f"  probe round {r + 1}/{probe_rounds}", flush=True)
    extra = {v: [c - p for c, p in zip(cpu[v], cpu["plain"])] for v in variants if v != "plain"}
    return {
        "rounds": rounds,
        "probe_rounds": probe_rounds,
        "cpu": cpu,
        "beyond_python": extra,
        "summary": {v: q(t) for v, t in cpu.items()},
        "beyond_summary": {v: q(t) for v, t in extra.items()},
        "breakdown": {
            v: {k: statistics.median(p[k] for p in ps) for k in ps[0]}
            for v, ps in parts.items()
            if ps
        },
        "gradscope_from": where,
        "plain_gc": statistics.median(plain_gc) if plain_gc else 0.0,
        "plain_exit": statistics.median(plain_exit) if plain_exit else 0.0,
    }


def label_of(variant: str) -> str:
    kind, _, tree = variant.partition(":")
    name = "`gradscope run`" if kind == "run" else "`watch` in the script"
    return f"{name} ({tree})" if tree else name


def render(meta: dict[str, Any], res: dict[str, Any]) -> str:
    variants = list(res["summary"])
    lines = [
        SECTION,
        "",
        f"{meta['date']}, `{meta['command']}`; torch {meta['torch']}, Python {meta['python']}, "
        f"{meta['cpu']} ({meta['cpu_count']} cores), load average "
        f"{meta['loadavg_start'][0]:.2f} → {meta['loadavg_end'][0]:.2f}; trees: "
        + ", ".join(f"`{k}` = {v}" for k, v in meta["trees"].items())
        + "."
        + (" **Quick smoke run: not a measurement.**" if meta["quick"] else ""),
        "",
        "benchmarks/run_target.py `--workload tiny --steps 2 --warmup 0` (a 32-64-10 MLP, "
        "2 steps), each variant in its own process, in a shuffled order each round: "
        "`python run_target.py`; `python -m gradscope run --quiet run_target.py`; "
        "`python run_target.py --watch` (`gradscope.watch(model, quiet=True)`, then "
        "`close()`). Defaults otherwise (TensorBoard and the HTML report on). CPU: user + "
        "system seconds of the whole child process; beyond python: paired per round. "
        f"{res['rounds']} rounds (median, p25–p75).",
        "",
        "| variant | CPU s | beyond python, s |",
        "|---|---|---|",
    ]
    for v in variants:
        med, lo, hi = res["summary"][v]
        if v == "plain":
            lines.append(f"| `python` | {med:.2f} ({lo:.2f}–{hi:.2f}) | — |")
            continue
        bm, bl, bh = res["beyond_summary"][v]
        lines.append(
            f"| {label_of(v)} | {med:.2f} ({lo:.2f}–{hi:.2f}) | {bm:.2f} ({bl:.2f}–{bh:.2f}) |"
        )
    parts = res["breakdown"]
    shown = [v for v in variants if v in parts]
    lines += [
        "",
        f"Where it goes: CPU seconds, medians of {res['probe_rounds']} probed runs per "
        "variant (`--probe`: imports timed per module, stages less the imports inside them, "
        "the garbage collector's passes apart; the probe itself adds a little). *Imports* are "
        "those of modules that plain `python run_target.py` never loads, each under the "
        "outermost such package that loaded it (PIL loaded by matplotlib is matplotlib's; "
        "loaded by gradscope itself, PIL). Garbage collection: the probed run's less plain "
        f"python's in the same round (python's own passes: {res['plain_gc']:.2f} s). The timed "
        "total also holds what the probe does not see: the interpreter's exit (python's own: "
        f"{res['plain_exit']:.2f} s, torch's teardown; more modules, more to tear down), the "
        "steps' hooks, and the noise of separate processes.",
        "",
        "| part | " + " | ".join(label_of(v) for v in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    keys = ["imports"] + [f"imports: {g}" for g in (*IMPORT_GROUPS, "other")]
    keys += [row for row, _ in ROWS] + [GC_ROW, SUM_ROW]
    for key in keys:
        name = f"  {key.split(': ', 1)[1]}" if key.startswith("imports: ") else key
        name = name.replace("  ", "&nbsp;&nbsp;&nbsp;")
        lines.append(f"| {name} | " + " | ".join(f"{parts[v][key]:.3f}" for v in shown) + " |")
    lines.append(
        "| **total beyond python** (timed rounds, whole process) | "
        + " | ".join(f"{res['beyond_summary'][v][0]:.3f}" for v in shown)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--probe"]:
        sep = args_in.index("--")
        probe(args_in[1], args_in[sep + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--probe-rounds", type=int, default=5)
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run the gradscope package of this commit (git archive), e.g. b446cd9",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 probe round")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "startup.json")
    args = parser.parse_args(args_in)
    if args.rounds < 1 or args.probe_rounds < 0:
        parser.error("--rounds >= 1, --probe-rounds >= 0")
    sys.path.insert(0, str(HERE))
    import overhead

    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gradscope"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="gs-bench-tree-") as tmp:
        trees: dict[str, Path | None] = {}
        names: dict[str, str] = {}
        if args.before:
            trees["before"] = extract(args.before, Path(tmp))
            names["before"] = args.before
            trees["after"] = ROOT
            names["after"] = f"{head}{' + uncommitted changes' if dirty else ''}"
        else:
            trees[""] = ROOT
            names["this tree"] = f"{head}{' + uncommitted changes' if dirty else ''}"
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": args.quick,
            "command": " ".join(["python", "benchmarks/startup.py", *args_in]),
            "cpu": overhead.cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "trees": names,
            **_versions(),
        }
        res = measure(
            trees, 2 if args.quick else args.rounds, 1 if args.quick else args.probe_rounds, 0
        )
    meta["loadavg_end"] = os.getloadavg()
    section = render(meta, res)
    overhead.publish(section, args.out, args.json, {"meta": meta, "results": res})


def _versions() -> dict[str, str]:
    import platform

    import torch

    return {"torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
