"""Run the pathology corpus under ``gradscope.watch`` (default settings) and score it.

    python -m benchmarks.zoo.run                       # everything: both splits, outcomes
    python -m benchmarks.zoo.run --split heldout --jobs 2
    python -m benchmarks.zoo.run --families dead_relu_adam,ok_autoencoder --quick
    python -m benchmarks.zoo.run --rediagnose          # current rules on the kept records
    python -m benchmarks.zoo.run --rediagnose --thresholds '{"depth_vanish_ratio": 1e-3}'
    python -m benchmarks.zoo.run --cures               # also rerun with each suggested option

Outputs (``--out``, default ``benchmarks/results/zoo``): ``runs.jsonl`` (label + findings per
run), ``outcomes.json`` (the outcome cache, keyed by run id: plain PyTorch, no gradscope, so
it is reused by later runs), ``cures.jsonl``, ``score.json``, ``misses.json``, ``table.md``,
and ``runs/<id>/`` (the run directories, kept for ``--rediagnose``; not tracked by git).
gradscope is whatever ``import gradscope`` resolves to (set ``PYTHONPATH`` to pick a tree).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..overhead import replace_section
from . import families as fam
from .outcome import final_loss, outcome, rescued, train

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "zoo"
RAW_FILE = "zoo_raw.parquet"  # the rules' working columns (_n, _units) the Parquet leaves out


# -- one live run -------------------------------------------------------------------------------
class _Capture:
    """Keeps the raw working columns of every table the Diagnoser is fed (``_n``, ``_units``:
    the rules read them, the published Parquet leaves them out), for re-diagnosis."""

    rows: list[tuple[int, str, str, str, float]] | None = None

    @classmethod
    def install(cls) -> None:
        from gradscope.rules import engine

        if getattr(engine.Diagnoser.update, "_zoo", False):
            return
        orig = engine.Diagnoser.update

        def update(self: Any, table: Any, layers: Any, *args: Any, **kwargs: Any) -> Any:
            if cls.rows is not None:
                for i, (layer, kind, metric) in enumerate(table.columns):
                    if metric.startswith("_") and metric in engine.RULE_METRICS:
                        sel = table.col == i
                        for s, v in zip(table.step[sel].tolist(), table.value[sel].tolist()):
                            cls.rows.append((int(s), layer, kind, metric, float(v)))
            return orig(self, table, layers, *args, **kwargs)

        update._zoo = True  # type: ignore[attr-defined]
        engine.Diagnoser.update = update  # type: ignore[method-assign]


def _finding(f: dict[str, Any]) -> dict[str, Any]:
    ev = f.get("evidence") or {}
    return {
        "kind": f["kind"],
        "severity": f["severity"],
        "layer": f["layer"],
        # a grouped finding lists every layer in ``layers`` (the primary first)
        "also_layers": list(f.get("layers") or [])[1:] or list(ev.get("also_layers") or []),
        "first_step": f["first_step"],
        "last_step": f["last_step"],
        "suggestion": f.get("suggestion") or "",
    }


def live(
    spec: fam.RunSpec, runs_dir: Path, options: dict[str, Any] | None = None, keep: bool = True
) -> dict[str, Any]:
    """Train ``spec`` under ``gradscope.watch`` (default settings, plus ``options``); returns
    its findings and final loss. The run directory is ``runs_dir/<id>`` (kept when ``keep``)."""
    import gradscope

    _Capture.install()
    torch.set_num_threads(1)
    task, label = spec.make("patho")
    # one directory per option: two workers may run cures of the same run at once
    name = spec.id
    if options:
        name += "--" + re.sub(
            r"[^A-Za-z0-9.]+", "_", ",".join(f"{k}={v}" for k, v in options.items())
        )
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    _Capture.rows = []
    t0 = time.perf_counter()
    error = None
    losses: list[float] = []
    try:
        with gradscope.watch(
            task.model,
            task.opt,
            out=str(runs_dir),
            name=name,
            quiet=True,
            tensorboard=False,
            report=False,
            **(options or {}),
        ) as scope:
            losses = train(task)
    except Exception as e:  # a remedy that stops the run (guard's error) is an outcome too
        error = f"{type(e).__name__}: {e}"[:300]
    wall = time.perf_counter() - t0
    findings = [_finding(f) for f in scope.findings] if "scope" in locals() else []
    raw, _Capture.rows = _Capture.rows, None
    if keep and raw:
        import pandas as pd

        pd.DataFrame(raw, columns=["step", "layer", "kind", "metric", "value"]).to_parquet(
            run_dir / RAW_FILE, index=False
        )
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    final = final_loss(task, losses) if len(losses) == task.steps else math.nan
    return {
        "id": spec.id,
        "family": spec.family,
        "split": spec.split,
        "params": spec.params,
        "label": label.to_json(),
        "findings": findings,
        "final_loss": None if math.isnan(final) else final,
        "error": error,
        "wall_s": round(wall, 3),
    }


# -- workers ------------------------------------------------------------------------------------
def _init_worker() -> None:
    torch.set_num_threads(1)


def _job(args: tuple[str, Any]) -> Any:
    what, payload = args
    if what == "live":
        spec, runs_dir = payload
        return live(spec, Path(runs_dir))
    if what == "rediagnose":
        run_dir, overrides = payload
        return rediagnose(Path(run_dir), overrides)
    if what == "outcome":
        return payload.id, {**outcome(payload), "key": payload.key()}
    if what == "cure":
        spec, option, sibling, runs_dir = payload
        r = live(spec, Path(runs_dir), options=parse_option(option), keep=False)
        final = r["final_loss"]
        cured = final is not None and r["error"] is None and rescued(final, sibling)
        return {
            "id": spec.id,
            "option": option,
            "final_loss": final,
            "sibling": sibling,
            "error": r["error"],
            "cured": bool(cured),
        }
    raise ValueError(what)


def _map(jobs: list[tuple[str, Any]], n: int, label: str) -> list[Any]:
    out = []
    t0 = time.perf_counter()
    if n <= 1:
        it: Any = map(_job, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(n, initializer=_init_worker)
        it = pool.imap(_job, jobs, chunksize=1)
    try:
        for i, r in enumerate(it, 1):
            out.append(r)
            if i % 10 == 0 or i == len(jobs):
                print(f"  {label}: {i}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out


# -- suggestions --------------------------------------------------------------------------------
_PY = re.compile(r"\b(clip|guard|swap|recycle)\s*=\s*('[^']*'|\"[^\"]*\"|True|False)")
_CLI = re.compile(r"--(clip|swap)\s+(\S+)|--(guard|recycle)\b")


def suggested_options(text: str) -> list[str]:
    """The gradscope options a suggestion names, in Python form (``clip='zclip'``), from
    either form (``watch(..., clip='zclip')`` or ``--clip zclip``); deduplicated, in order."""
    out: list[str] = []
    for key, value in _PY.findall(text):
        if value == "False":
            continue
        out.append(
            f"{key}={value}" if value == "True" else f"{key}='{value.strip(chr(39) + chr(34))}'"
        )
    for m in _CLI.finditer(text):
        if m.group(1):
            out.append(f"{m.group(1)}='{m.group(2).strip(chr(39) + chr(34))}'")
        else:
            out.append(f"{m.group(3)}=True")
    return list(dict.fromkeys(out))


def parse_option(option: str) -> dict[str, Any]:
    key, _, value = option.partition("=")
    return {key: True if value == "True" else value.strip("'\"")}


# -- rediagnosis --------------------------------------------------------------------------------
def rediagnose(run_dir: Path, thresholds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The current rules on a kept run directory, without training: every metrics chunk (one
    per flush) in step order with the raw columns captured live, and the tracer's verdicts
    from ``events.jsonl`` before the chunk of their step, as the live run fed them."""
    import dataclasses

    import numpy as np
    import pandas as pd

    from gradscope.records import LongTable
    from gradscope.rules.engine import Diagnoser, layer_info
    from gradscope.rules.nonfinite import traced_episode
    from gradscope.rules.thresholds import Thresholds

    meta = json.loads((run_dir / "run.json").read_text())
    config = meta.get("config") or {}
    base = dict(config.get("thresholds") or {})
    names = {f.name for f in dataclasses.fields(Thresholds)}
    base = {k: v for k, v in base.items() if k in names}
    base.update(thresholds or {})
    diag = Diagnoser(
        Thresholds(**base),
        lambda f, new: None,
        sample_every=int(config.get("activation_every", 10)),
    )
    info = layer_info(meta.get("layers") or [], meta.get("sites") or [])
    raw_path = run_dir / RAW_FILE
    raw = pd.read_parquet(raw_path) if raw_path.exists() else None
    traced = []
    events = run_dir / "events.jsonl"
    if events.exists():
        for line in events.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "nonfinite_traced":
                traced.append({k: v for k, v in e.items() if k not in ("event", "time", "t")})
    parts = sorted((run_dir / "metrics").glob("part-*.parquet"))
    for part in parts:
        df = pd.read_parquet(part)
        lo, hi = int(df["step"].min()), int(df["step"].max())
        if raw is not None:
            df = pd.concat([df, raw[(raw.step >= lo) & (raw.step <= hi)]], ignore_index=True)
            df = df.sort_values("step", kind="stable")
        for t in [t for t in traced if int(t["step"]) <= hi]:
            diag.merge(traced_episode(t))
            traced.remove(t)
        keys = list(zip(df["layer"].astype(str), df["kind"].astype(str), df["metric"].astype(str)))
        columns = list(dict.fromkeys(keys))
        index = {c: i for i, c in enumerate(columns)}
        table = LongTable(
            df["step"].to_numpy(np.int64),
            np.array([index[k] for k in keys], dtype=np.int64),
            df["value"].to_numpy(np.float64),
            columns,
        )
        diag.update(table, info)
    for t in traced:
        diag.merge(traced_episode(t))
    return [_finding(f) for f in diag.snapshot()]


# -- main ---------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", default="all", choices=("calibration", "heldout", "all"))
    ap.add_argument("--families", default="", help="comma-separated family names")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one variant per family")
    ap.add_argument("--no-outcomes", action="store_true", help="skip outcome confirmation")
    ap.add_argument("--cures", action="store_true", help="rerun with each suggested option")
    ap.add_argument("--rediagnose", action="store_true", help="rules on the kept records only")
    ap.add_argument(
        "--reuse-live",
        action="store_true",
        help="take the live runs' results from runs.jsonl (e.g. to add --cures)",
    )
    ap.add_argument(
        "--score-only", action="store_true", help="score the stored results again, run nothing"
    )
    ap.add_argument("--thresholds", default="", help="JSON overrides for --rediagnose")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument(
        "--results",
        default="",
        help="markdown file whose section to replace (default: benchmarks/RESULTS.md after a "
        "whole run into the default --out)",
    )
    args = ap.parse_args(argv)
    import gradscope

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    names = [s for s in args.families.split(",") if s]
    unknown = [n for n in names if n not in fam.FAMILY]
    if unknown:
        ap.error(f"unknown families: {', '.join(unknown)}")
    specs = fam.enumerate_runs(args.split, names or None)
    if args.quick:
        seen: set[str] = set()
        specs = [s for s in specs if not (s.family in seen or seen.add(s.family))]
    print(
        f"zoo: {len(specs)} runs, {len({s.family for s in specs})} families; gradscope "
        f"{gradscope.__version__} from {Path(gradscope.__file__).parent}",
        flush=True,
    )
    results_path = out / "runs.jsonl"
    t_all = time.perf_counter()
    previous = {r["id"]: r for r in _read_jsonl(results_path)}
    timings_path = out / "timings.json"
    if args.score_only:
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        md = Path(args.results) if args.results else None
        if md is None and out.resolve() == DEFAULT_OUT.resolve():
            md = DEFAULT_OUT.parents[1] / "RESULTS.md"
        return _score(out, [previous[k] for k in sorted(previous)], {}, md, timings)
    if args.rediagnose:
        overrides = json.loads(args.thresholds) if args.thresholds else {}
        results = []
        for s in specs:
            r = previous.get(s.id)
            if r is None or not (runs_dir / s.id).exists():
                print(f"  no kept run for {s.id}; run it first", file=sys.stderr)
                continue
            results.append(dict(r))
        jobs = [("rediagnose", (str(runs_dir / r["id"]), overrides)) for r in results]
        for r, found in zip(results, _map(jobs, args.jobs, "rediagnose"), strict=True):
            r["findings"] = found
        print(f"rediagnosed {len(results)} runs in {time.perf_counter() - t_all:.1f} s")
        target = out / ("rediagnosed.jsonl" if overrides else "runs.jsonl")
        if overrides:
            _write_jsonl(target, results)
        else:
            previous.update({r["id"]: r for r in results})
            _write_jsonl(target, list(previous.values()))
        return _score(out, results, overrides)
    # live runs
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.reuse_live:
        results = [previous[s.id] for s in specs if s.id in previous]
        old = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        timings.update({k: v for k, v in old.items() if k in ("live runs", "outcomes")})
    else:
        results = _map([("live", (s, str(runs_dir))) for s in specs], args.jobs, "live")
        timings["live runs"] = time.perf_counter() - t0
    print(f"live runs: {time.perf_counter() - t0:.0f} s", flush=True)
    previous.update({r["id"]: r for r in results})
    _write_jsonl(results_path, [previous[k] for k in sorted(previous)])
    # outcomes (cached)
    cache_path = out / "outcomes.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if not args.no_outcomes:
        todo = [
            s
            for s in specs
            if fam.FAMILY[s.family].kind != fam.HEALTHY
            and (cache.get(s.id) or {}).get("key") != s.key()
        ]
        t0 = time.perf_counter()
        for rid, o in _map([("outcome", s) for s in todo], args.jobs, "outcomes"):
            cache[rid] = o
        cache_path.write_text(json.dumps(dict(sorted(cache.items())), indent=1) + "\n")
        if todo or "outcomes" not in timings:
            timings["outcomes"] = time.perf_counter() - t0
        print(f"outcomes: {len(todo)} new in {time.perf_counter() - t0:.0f} s", flush=True)
    # cures
    if args.cures:
        t0 = time.perf_counter()
        cure_jobs = []
        for r in results:
            o = cache.get(r["id"])
            if not o or not o.get("confirmed"):
                continue
            options: list[str] = []
            for f in r["findings"]:
                if f["severity"] in ("warning", "error"):
                    options += suggested_options(f["suggestion"])
            spec = next(s for s in specs if s.id == r["id"])
            for option in dict.fromkeys(options):
                cure_jobs.append(("cure", (spec, option, o["sibling"], str(runs_dir))))
        cures = _map(cure_jobs, args.jobs, "cures")
        old = [
            c for c in _read_jsonl(out / "cures.jsonl") if c["id"] not in {r["id"] for r in results}
        ]
        _write_jsonl(out / "cures.jsonl", sorted(old + cures, key=lambda c: (c["id"], c["option"])))
        timings["cure runs"] = time.perf_counter() - t0
        print(f"cures: {len(cure_jobs)} runs in {timings['cure runs']:.0f} s", flush=True)
    print(f"total: {time.perf_counter() - t_all:.0f} s", flush=True)
    timings_path.write_text(json.dumps({k: round(v) for k, v in timings.items()}) + "\n")
    whole = args.split == "all" and not names and not args.quick and not args.no_outcomes
    md_path = Path(args.results) if args.results else None
    if md_path is None and whole and out.resolve() == DEFAULT_OUT.resolve():
        md_path = DEFAULT_OUT.parents[1] / "RESULTS.md"
    return _score(out, [previous[k] for k in sorted(previous)], {}, md_path, timings)


def _score(
    out: Path,
    results: list[dict[str, Any]],
    overrides: dict[str, Any],
    results_md: Path | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    from . import score

    cache_path = out / "outcomes.json"
    outcomes = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cures = _read_jsonl(out / "cures.jsonl")
    report = score.report(sorted(results, key=lambda r: r["id"]), outcomes, cures)
    suffix = "-rediagnosed" if overrides else ""
    (out / f"score{suffix}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / f"misses{suffix}.json").write_text(json.dumps(report["misses"], indent=1) + "\n")
    md = score.markdown(report)
    (out / f"table{suffix}.md").write_text(md)
    if not overrides:
        score.confusion_figure(report, out.parent / "zoo_confusion.png")
    if results_md is not None:
        replace_section(results_md, results_section(report, md, timings or {}))
    print(md)
    return 0


RESULTS_TITLE = "## Diagnosis on the pathology corpus"


def results_section(report: dict[str, Any], md: str, timings: dict[str, float]) -> str:
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if k != "note")
    if timings.get("note"):
        took += f" ({timings['note']})"
    return (
        f"{RESULTS_TITLE}\n\n"
        "The rules' default thresholds on `benchmarks/zoo` (families, labels and scoring: "
        "[zoo/README.md](zoo/README.md)), each run under `gradscope.watch` with default settings. "
        "Reproduce (2 worker processes, one thread each"
        + (f"; this run took {took} on the 2-core VM" if took else "")
        + "):\n\n"
        "```bash\npython -m benchmarks.zoo.run --jobs 2 --cures\n```\n\n"
        "The thresholds are chosen on the calibration families only (each one's choice and the "
        "corpus figure behind it: docs/thresholds.md); the held-out families measure whether "
        "that generalises. What changed against the rules before calibration, and the misses "
        "that remain with their reasons: the next section. Per-run results in "
        "`results/zoo/runs.jsonl`, outcomes in `results/zoo/outcomes.json`, misses for the rule "
        "developer in `results/zoo/misses.json`, cure runs in `results/zoo/cures.jsonl`.\n\n"
        "![confusion matrix](results/zoo_confusion.png)\n\n" + md
    )


if __name__ == "__main__":
    raise SystemExit(main())
