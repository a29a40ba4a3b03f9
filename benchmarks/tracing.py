"""CPU cost of gradscope's non-finite tracer against ``torch.autograd.detect_anomaly``, and what
each names as the source of three planted NaN/Inf faults.

Timing reuses benchmarks/overhead.py: its workloads, its interleaved runner (one block of every
variant per round, shuffled, process CPU time, one torch thread) and its paired ratios. The
variants here: ``plain``; ``anomaly`` / ``anomaly_nocheck`` (each step inside
``detect_anomaly(check_nan=True / False)``); ``trace_off`` / ``trace_auto`` / ``trace_always``
(gradscope recording only gradient norms and the loss, with ``trace_nonfinite`` off, auto,
always); ``default_auto`` (gradscope's default configuration). The tracer's own cost is the
ratio to ``trace_off``, paired within a round. See benchmarks/README.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import gradscope

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # already there when run as a script
    sys.path.insert(0, str(HERE))

import overhead  # noqa: E402
from overhead import (  # noqa: E402
    NEVER,
    SEED,
    WORKLOADS,
    Batch,
    Workload,
    replace_section,
)

SECTION = "## Non-finite tracing vs detect_anomaly (CPU)"
# gradscope's cheapest recording (overhead.py --breakdown's `grad_norms`): gradient norms, the
# loss and flushes every step; activation statistics and update ratios never after step 0.
FLOOR: dict[str, Any] = {
    "activation_every": NEVER,
    "update_every": NEVER,
    "tensorboard": False,
    "quiet": True,
}
# variant -> gradscope.watch options (None: not watched; the anomaly variants are not watched)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "anomaly": None,
    "anomaly_nocheck": None,
    "trace_off": {**FLOOR, "trace_nonfinite": "off"},
    "trace_auto": {**FLOOR, "trace_nonfinite": "auto"},
    # auto as it was before replay on detection: the same, with nothing kept per forward call
    "trace_auto_noreplay": {**FLOOR, "trace_nonfinite": "auto", "_no_replay": True},
    "trace_always": {**FLOOR, "trace_nonfinite": "always"},
    "default_auto": {"quiet": True},  # everything at its default (TensorBoard on, mode "auto")
}
ANOMALY = {"anomaly": True, "anomaly_nocheck": False}  # variant -> detect_anomaly(check_nan=)
BASE = "trace_off"  # the tracer's own cost: a variant's ratio to this one
GOALS = {"trace_auto": 1.05, "trace_always": 1.30}  # max median paired ratio to BASE
# ~11 min in all on a 2-core VM: a round (one 100-step block of each of the 7 variants) takes
# about 6 s (mlp), 58 s (cnn) and 42 s (transformer), plus one warm-up block per variant
ROUNDS = {"mlp": 20, "cnn": 4, "transformer": 5}
QUICK_ROUNDS, QUICK_BLOCK = 3, 5


# -- timing -------------------------------------------------------------------------------------
class TracingVariant(overhead.Variant):
    """overhead.Variant, plus the anomaly variants: each step runs inside ``detect_anomaly``."""

    # variant -> `nonfinite` findings of its scope at close (healthy runs: expected 0)
    nonfinite: ClassVar[dict[str, int]] = {}
    # variant -> detect_anomaly(check_nan=) for the variants that run inside anomaly mode
    # (benchmarks/peers.py names its own)
    anomaly_modes: ClassVar[dict[str, bool]] = ANOMALY

    def __init__(
        self,
        kind: str,
        options: dict[str, Any] | None,
        wl: Workload,
        state: dict[str, torch.Tensor],
        batches: list[Batch],
        run_root: str,
    ) -> None:
        self.anomaly: torch.autograd.detect_anomaly | None = None
        no_replay = bool(options and options.get("_no_replay"))
        if options is not None:
            options = {k: v for k, v in options.items() if k != "_no_replay"}
        if kind in self.anomaly_modes:
            with warnings.catch_warnings():  # "Anomaly Detection has been enabled. ..."
                warnings.simplefilter("ignore", UserWarning)
                # one object, entered at every step: it restores the state seen at creation (off)
                self.anomaly = torch.autograd.detect_anomaly(check_nan=self.anomaly_modes[kind])
        super().__init__(kind, options, wl, state, batches, run_root)
        if no_replay and self.scope is not None:  # through the documented test hook
            rec = self.scope.parts.recorder
            if rec.replay is not None:
                rec.replay.close()
                rec.replay = None

    def close(self) -> None:
        if self.scope is not None and not self.scope.closed:
            self.scope.close()
            # a healthy run: a `nonfinite` finding here would mean the tracer named a culprit
            # and disarmed, so `trace_always` would not have been tracing every step
            TracingVariant.nonfinite[self.kind] = sum(
                f["kind"] == "nonfinite" for f in self.scope.findings
            )
        super().close()

    def step(self) -> None:
        if self.anomaly is None:
            super().step()
            return
        with self.anomaly:
            super().step()


def tracer_cost(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Each traced variant against ``trace_off`` (same recording, no tracer), with its goal."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("trace_auto", "trace_always"):
        s = overhead.paired(times[kind], times[BASE])
        goal = GOALS[kind]
        out[kind] = {**s, "goal": goal, "pass": s["ratio"] <= goal}
    out["trace_auto_noreplay"] = overhead.paired(times["trace_auto_noreplay"], times[BASE])
    # what keeping each forward call for a replay costs a clean step (no goal: within noise)
    out["keeping"] = overhead.paired(times["trace_auto"], times["trace_auto_noreplay"])
    return out


def replay_cost(wl: Workload, reps: int = 7) -> dict[str, float]:
    """The time of one replay (forward and backward with the tracer armed, then the buffers
    and RNG put back) against a training step of the same workload, process CPU time, median
    of ``reps``. Forced on a healthy step (the tracer names nothing, so every replay does the
    whole work)."""
    torch.manual_seed(SEED)
    model = wl.build()
    opt = wl.optimizer(model.parameters())
    batches = wl.batches(torch.Generator().manual_seed(SEED))
    root = tempfile.mkdtemp(prefix="gradscope-replay-")
    steps: list[float] = []
    replays: list[float] = []
    try:
        with gradscope.watch(model, opt, out=root, **FLOOR) as scope:
            replay = scope.parts.recorder.replay
            assert replay is not None, "replay on detection is off"
            for i in range(2 * reps + 2):
                x, y = batches[i % len(batches)]
                start = time.process_time()
                opt.zero_grad(set_to_none=True)
                wl.loss(model(x), y).backward()
                middle = time.process_time()
                if i >= 2:
                    replay.replay()
                end = time.process_time()
                opt.step()
                after = time.process_time()
                if i >= 2:
                    steps.append((middle - start) + (after - end))
                    replays.append(end - middle)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_ms = 1000 * sorted(steps)[len(steps) // 2]
    replay_ms = 1000 * sorted(replays)[len(replays) // 2]
    return {"step_ms": step_ms, "replay_ms": replay_ms, "ratio": replay_ms / step_ms}


def measure(wl: Workload, rounds: int, block: int) -> dict[str, Any]:
    TracingVariant.nonfinite.clear()
    res = overhead.run_as(TracingVariant, wl, VARIANTS, rounds, block)
    res["nonfinite_findings"] = dict(TracingVariant.nonfinite)
    res["tracer"] = tracer_cost(res["block_seconds"])
    res["replay"] = replay_cost(wl)
    return res


# -- planted faults: what detect_anomaly and the tracer name ------------------------------------
FAULT_STEP = 2  # the fault is planted from this step on
DEMO_STEPS = 5


class Log(nn.Module):
    """A custom module: log(x), -inf at x = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Sqrt(nn.Module):
    """A custom module: sqrt(x), whose derivative at x = 0 is +inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def classifier() -> nn.Sequential:
    """MLP classifier with a custom Log in the middle; its first layer copies the (positive)
    input to 8 units, so the Log sees exactly what the data holds."""
    torch.manual_seed(SEED)
    first = nn.Linear(4, 8)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4).repeat(2, 1))
        first.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), Log(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def sqrt_regressor() -> nn.Sequential:
    """Linear -> Sqrt -> Linear with positive weights: every output and residual is positive,
    so an infinite gradient keeps one sign across the batch (+inf, never inf - inf = NaN)."""
    torch.manual_seed(SEED)
    first, last = nn.Linear(4, 4), nn.Linear(4, 1)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
        last.weight.fill_(0.5)
        last.bias.fill_(0.1)
    return nn.Sequential(first, Sqrt(), last)


def class_batch(step: int, fault: str) -> Batch:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.rand(16, 4, generator=gen) + 0.5
    if step >= FAULT_STEP and fault == "log0":
        x[0] = -1.0  # ReLU -> 0 -> Log -> -inf, then NaN from the next Linear on
    if step >= FAULT_STEP and fault == "data":
        x[2, 1] = math.nan
    return x, torch.randint(0, 3, (16,), generator=gen)


def regression_batch(step: int) -> Batch:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.rand(16, 4, generator=gen) + 0.5, torch.zeros(16)


def zero_unit(model: nn.Sequential, step: int) -> None:
    """From FAULT_STEP on, unit 0 of the first layer has zero weights and bias: it outputs
    exactly 0, sqrt'(0) = +inf, and its weight and bias gradients are +inf (no NaN)."""
    first = model[0]
    if step == FAULT_STEP and isinstance(first, nn.Linear):
        with torch.no_grad():
            first.weight[0] = 0.0
            first.bias[0] = 0.0


@dataclass(frozen=True)
class Fault:
    name: str
    what: str  # the planted fault
    truth: str  # who made the first non-finite value
    build: Callable[[], nn.Sequential]
    batch: Callable[[int], Batch]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    plant: Callable[[nn.Sequential, int], None] | None = None


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.squeeze(-1), y)


FAULTS = [
    Fault(
        "forward_log0",
        "log(0): a custom `Log` after a ReLU that outputs 0, in the middle "
        "of an MLP classifier (cross-entropy)",
        "forward, `2` (Log): -inf from finite inputs",
        classifier,
        lambda s: class_batch(s, "log0"),
        F.cross_entropy,
    ),
    Fault(
        "backward_inf",
        "sqrt at exactly 0 (`Linear -> Sqrt -> Linear`, MSE): a unit with "
        "all-zero weights and bias",
        "backward, `1` (Sqrt): sqrt'(0) = +inf",
        sqrt_regressor,
        regression_batch,
        mse,
        zero_unit,
    ),
    Fault(
        "data_nan",
        "one NaN in the input batch (same classifier)",
        "the data (inputs of `0`)",
        classifier,
        lambda s: class_batch(s, "data"),
        F.cross_entropy,
    ),
]


def train(
    fault: Fault, model: nn.Sequential, steps: int, log: dict[str, Any] | None = None
) -> None:
    """A plain SGD loop: the optimizer steps every time, so from FAULT_STEP + 1 on the weights
    may hold what the fault step's gradients put there. ``log`` gets the current step and the
    Inf/NaN counts of the gradients at FAULT_STEP."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        if log is not None:
            log["step"] = step
        if fault.plant is not None:
            fault.plant(model, step)
        x, y = fault.batch(step)
        opt.zero_grad(set_to_none=True)
        fault.loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        if log is not None and step == FAULT_STEP:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            log["inf"] = sum(int(torch.isinf(g).sum()) for g in grads)
            log["nan"] = sum(int(torch.isnan(g).sum()) for g in grads)
        opt.step()


def anomaly_report(fault: Fault) -> dict[str, Any]:
    """Train under detect_anomaly: the step and function it raised at, and the innermost frame
    of the forward traceback it printed (a UserWarning), or that it raised nothing."""
    log: dict[str, Any] = {}
    out: dict[str, Any] = {"raised": False, "step": None, "function": None, "forward_frame": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly():
                train(fault, fault.build(), DEMO_STEPS, log)
        except RuntimeError as e:
            m = re.search(r"Function '(\w+)' returned nan values in its (\d+)th output", str(e))
            out.update(
                raised=True,
                step=log.get("step"),
                function=f"{m.group(1)} (output {m.group(2)})" if m else str(e)[:80],
            )
    for w in caught:
        msg = str(w.message)
        if msg.startswith("Error detected in"):
            frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', msg)
            if frames:
                path, func = frames[-1]
                out["forward_frame"] = f"{Path(path).name}:{func}"
    out["grads_at_fault_step"] = {k: log[k] for k in ("inf", "nan") if k in log}
    return out


def gradscope_report(fault: Fault, mode: str, root: str) -> dict[str, Any]:
    model = fault.build()
    with gradscope.watch(
        model,
        out=root,
        name=f"demo-{fault.name}-{mode}",
        quiet=True,
        tensorboard=False,
        trace_nonfinite=mode,
    ) as scope:
        train(fault, model, DEMO_STEPS)
    found = [f for f in scope.findings if f["kind"] == "nonfinite"]
    if not found:
        return {"found": False}
    f = found[0]
    ev = f.get("evidence", {})
    return {
        "found": True,
        "phase": f["phase"],
        "module": f["module"],
        "class": f["class"],
        "layer": f["layer"],
        "first_step": f["first_step"],
        "traced_at_step": ev.get("traced_at_step") if ev.get("traced") else None,
        "note": ev.get("note"),
    }


def run_demo() -> list[dict[str, Any]]:
    rows = []
    root = tempfile.mkdtemp(prefix="gradscope-bench-tracing-demo-")
    try:
        for fault in FAULTS:
            rows.append(
                {
                    "fault": fault.name,
                    "what": fault.what,
                    "truth": fault.truth,
                    "fault_step": FAULT_STEP,
                    "steps": DEMO_STEPS,
                    "anomaly": anomaly_report(fault),
                    "always": gradscope_report(fault, "always", root),
                    "auto": gradscope_report(fault, "auto", root),
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# -- reporting ----------------------------------------------------------------------------------
def fmt(s: dict[str, Any]) -> str:
    return f"{s['ratio']:.3f}× ({s['ratio_p25']:.3f}–{s['ratio_p75']:.3f})"


def fmt_anomaly(a: dict[str, Any]) -> str:
    g = a.get("grads_at_fault_step") or {}
    missed = (
        f"nothing at step {FAULT_STEP} (its gradients: {g['inf']} Inf, {g['nan']} NaN)" if g else ""
    )
    if not a["raised"]:
        return missed or f"nothing raised in {DEMO_STEPS} steps"
    frame = f", forward traceback ends in `{a['forward_frame']}`" if a["forward_frame"] else ""
    said = f"step {a['step']}: `{a['function']}`{frame}"
    return f"{missed}; then {said}" if missed else said


def fmt_scope(g: dict[str, Any]) -> str:
    if not g["found"]:
        return "no non-finite finding"
    when = f"step {g['first_step']}"
    traced = g["traced_at_step"]
    if traced is None:
        return f"{when}: {g['phase']} pass, no module named (phase inferred, not traced)"
    if traced != g["first_step"]:
        when += f" (traced at step {traced})"
    if g["module"] is not None:
        return f"{when}: {g['phase']}, `{g['module']}` ({g['class']})"
    if g["phase"] in ("forward", "data"):
        return f"{when}: data, no module: inputs of `{g['layer']}` already non-finite"
    if g["phase"] == "loss":
        return f"{when}: loss, no module: every module's output was finite"
    return f"{when}: {g['phase']}, no module: gradient at the output of `{g['layer']}` (loss)"


INTRO = (
    'Goals (issue): with `trace_nonfinite="auto"` the tracer costs ≤ 1.05×, with `"always"` '
    "≤ 1.30×, measured as the paired ratio to `trace_off` (the same recording with no tracer); "
    "the issue measured `detect_anomaly` at 1.4–1.7× of plain training. `trace_*` record only "
    "what every step needs (gradient norms, the loss, a Parquet flush per 100 steps; "
    "`activation_every` and `update_every` are 10⁹, so those probes run at step 0 only, in the "
    "untimed warm-up; no TensorBoard). `default_auto` is `gradscope.watch` "
    "with its defaults (mode `auto`, activation statistics and update ratios every 10th step, "
    "TensorBoard on). `anomaly` wraps every step in `torch.autograd.detect_anomaly()`, "
    "`anomaly_nocheck` in `detect_anomaly(check_nan=False)` (forward tracebacks only). "
    "`trace_auto_noreplay` is `trace_auto` without replay on detection (what `auto` was "
    "before it: nothing kept per forward call); *auto × auto without replay* is what keeping "
    "each forward call for a replay costs a clean step. *One replay* is the time of replaying "
    "one step (its forward and a backward with the tracer armed, then buffers and RNG put "
    "back), forced on a healthy step, against that workload's training step: a faulty run "
    "pays it once, on its first flagged step."
)
READING = (
    "**Reading these numbers.** Every run here is healthy, so `auto` is measured as a user "
    "pays for it almost always: its tracer is never armed, and what it adds over `trace_off` is "
    "the per-step flag (a finiteness test of the gradient-norm sum gradscope already computes, "
    "and of the loss). `always` is the price of the hooks on every module and the checks of "
    "every module output and gradient at every step; on a faulty run it drops to the `auto` "
    "cost once the culprit is named. A goal passes when the median ratio is at or below it; if "
    "the p25–p75 spread straddles a goal, the verdict is not settled by this run (rerun with "
    "more `--rounds` on a quiet machine). The ratios to `plain` include the recording itself, "
    "which benchmarks `## Watch overhead` measures. The planted-fault table is not timed: it "
    "records what each tool names as the source of the first NaN/Inf in a plain loop (the "
    f"optimizer steps every time, so from step {FAULT_STEP + 1} on the weights may hold what "
    "the fault step's gradients put there). On the CPU `auto` replays the flagged step with the "
    "tracer armed before the optimizer step, so it names the culprit on the step the fault "
    "appeared, recurring or not; where a replay cannot reproduce the step it falls back to "
    "arming at the flag and tracing from the next step."
)


def nonfinite_warning(results: dict[str, Any], understated: str) -> list[str]:
    """Lines that warn of `nonfinite` findings on the (healthy) timing runs, if there were."""
    bad = {
        f"{wl}/{k}": n
        for wl, res in results.items()
        for k, n in res["nonfinite_findings"].items()
        if n
    }
    if not bad:
        return []
    return [
        "",
        f"**Warning:** non-finite findings on the healthy timing runs: {bad}; "
        f"a tracer that named a culprit stopped tracing, so {understated} understated.",
    ]


def render(meta: dict[str, Any], results: dict[str, Any], demo: list[dict[str, Any]]) -> str:
    lines = [
        SECTION,
        "",
        *overhead.provenance(
            meta,
            results,
            "quick smoke run (a few short blocks)",
            "ratio = median over rounds of (variant block / reference block in the same round), "
            "in brackets the p25–p75 of those paired ratios",
        ),
        INTRO,
        "",
        "| workload | `anomaly` × plain | `trace_auto` × plain | `trace_always` × plain "
        "| auto tracer × `trace_off` | always tracer × `trace_off` | goals (≤ 1.05× / ≤ 1.30×) "
        "| auto × auto without replay | one replay |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for wl, res in results.items():
        s, t, r = res["summary"], res["tracer"], res["replay"]
        verdict = " / ".join(
            "pass" if t[k]["pass"] else "**FAIL**" for k in ("trace_auto", "trace_always")
        )
        lines.append(
            f"| {wl} | {fmt(s['anomaly'])} | {fmt(s['trace_auto'])} | "
            f"{fmt(s['trace_always'])} | {fmt(t['trace_auto'])} | "
            f"{fmt(t['trace_always'])} | {verdict} | {fmt(t['keeping'])} | "
            f"{r['replay_ms']:.1f} ms ({r['ratio']:.2f} step) |"
        )
    lines += [
        "",
        "All variants:",
        "",
        "| workload | variant | ms/step (median) | × plain | × `trace_off` |",
        "|---|---|--:|--:|--:|",
    ]
    for wl, res in results.items():
        times = res["block_seconds"]
        for kind, s in res["summary"].items():
            off = fmt(overhead.paired(times[kind], times[BASE]))
            lines.append(f"| {wl} | {kind} | {s['ms_per_step']:.2f} | {fmt(s)} | {off} |")
    lines += [
        "",
        "### Who is named: three planted faults",
        "",
        f"A plain SGD loop of {DEMO_STEPS} steps per fault (steps count from 0), the fault "
        f"planted from step {FAULT_STEP} on. `detect_anomaly()`: the step and backward function "
        "of the RuntimeError, and the last frame of the forward traceback it warns with. "
        "gradscope (`quiet=True`): the first `nonfinite` finding of `scope.findings`; modules "
        "by their `named_modules()` path.",
        "",
        "| fault | truth | `detect_anomaly()` | gradscope `always` | gradscope `auto` |",
        "|---|---|---|---|---|",
    ]
    for row in demo:
        lines.append(
            f"| {row['what']} | {row['truth']} | {fmt_anomaly(row['anomaly'])} | "
            f"{fmt_scope(row['always'])} | {fmt_scope(row['auto'])} |"
        )
    lines += nonfinite_warning(results, "its cost is")
    lines += ["", READING]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args, plan, block = overhead.parse_plan(
        __doc__, argv, ROUNDS, QUICK_ROUNDS, QUICK_BLOCK, HERE / "results" / "tracing.json"
    )
    meta = overhead.run_meta(
        "tracing.py",
        argv,
        args.quick,
        block,
        variants=VARIANTS,
        goals=GOALS,
        loadavg_start=os.getloadavg(),
    )
    started = time.monotonic()
    results: dict[str, Any] = {}
    for name, rounds in plan.items():
        print(f"{name}: {rounds} rounds x {len(VARIANTS)} variants x {block} steps", flush=True)
        results[name] = {"rounds": rounds, **measure(WORKLOADS[name], rounds, block)}
    meta["loadavg_end"] = os.getloadavg()
    print("planted faults: detect_anomaly vs trace_nonfinite", flush=True)
    demo = run_demo()
    meta["seconds"] = round(time.monotonic() - started, 1)

    section = render(meta, results, demo)
    print("\n" + section)
    replace_section(args.out, section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"meta": meta, "workloads": results, "demo": demo}, indent=2) + "\n"
    )
    print(f"wrote {args.out} and {args.json} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
