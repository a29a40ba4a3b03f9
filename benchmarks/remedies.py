"""CPU cost of gradscope's remedies (``clip=``, ``guard=``, ``swap=`` / ``recycle=``) on a healthy
run, against ``gradscope.watch`` with no remedy and against a hand-written ``clip_grad_norm_``.

Timing reuses benchmarks/overhead.py: its workloads, its interleaved runner (one block of every
variant per round, shuffled, process CPU time, one torch thread) and its paired ratios. The
variants here: ``plain``; ``plain_clip_grad_norm`` (no gradscope, ``clip_grad_norm_(params, 1.0)``
before each step: what clipping costs a user today); ``default`` (``gradscope.watch`` with no
remedy); and ``default`` plus one remedy each: ``clip_norm``, ``clip_autoclip``,
``clip_autoclip_1000``, ``clip_agc``, ``clip_zclip``, ``clip_zclip_per_layer``, ``guard`` and
``swap_recycle``. A remedy's own cost is its ratio to ``default``, paired within a round. See
benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch

from gradscope import rundir

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # already there when run as a script
    sys.path.insert(0, str(HERE))

import overhead  # noqa: E402
from overhead import (  # noqa: E402
    BLOCK,
    WORKLOADS,
    Batch,
    Workload,
    replace_section,
)

SECTION = "## Remedies: cost on a healthy run (CPU)"
DEFAULT: dict[str, Any] = {"quiet": True}  # gradscope's defaults (TensorBoard on), no stderr
# variant -> gradscope.watch options (None: not watched)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "plain_clip_grad_norm": None,
    "default": DEFAULT,
    "clip_norm": {**DEFAULT, "clip": "norm:1.0"},
    "clip_autoclip": {**DEFAULT, "clip": "autoclip"},
    "clip_autoclip_1000": {**DEFAULT, "clip": "autoclip:history=1000"},
    "clip_agc": {**DEFAULT, "clip": "agc:0.01"},
    "clip_zclip": {**DEFAULT, "clip": "zclip"},
    "clip_zclip_per_layer": {**DEFAULT, "clip": "zclip:per_layer"},
    "guard": {**DEFAULT, "guard": True},
    "swap_recycle": {**DEFAULT, "swap": "relu->leaky_relu:0.01", "recycle": True},
}
MAX_NORM = 1.0  # plain_clip_grad_norm's max_norm, = clip_norm's
BASE = "default"  # a remedy's own cost: its ratio to this one
REMEDIES = [k for k in VARIANTS if k.startswith(("clip_", "guard", "swap"))]
# ~17 min in all on a 2-core VM: a round (one 100-step block of each of the 11 variants) takes
# about 9 s (mlp), 85 s (cnn) and 60 s (transformer), plus one warm-up block per variant
ROUNDS = {"mlp": 20, "cnn": 4, "transformer": 5}
QUICK_ROUNDS, QUICK_BLOCK = 3, 5
# training changes no weight without dropout: these pairs must end with identical weights
SAME_AS = {
    "default": "plain",
    "guard": "plain",
    "swap_recycle": "plain",
    "clip_norm": "plain_clip_grad_norm",
}


# -- timing -------------------------------------------------------------------------------------
class RemedyVariant(overhead.Variant):
    """overhead.Variant, plus ``plain_clip_grad_norm`` (clip_grad_norm_ before each step), and a
    record of what each scope did (remedy events, findings, warnings, internal errors) and of
    its final weights."""

    # variant -> what happened in it (filled at close)
    report: ClassVar[dict[str, dict[str, Any]]] = {}
    weights: ClassVar[dict[str, list[torch.Tensor]]] = {}

    def __init__(
        self,
        kind: str,
        options: dict[str, Any] | None,
        wl: Workload,
        state: dict[str, torch.Tensor],
        batches: list[Batch],
        run_root: str,
    ) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__init__(kind, options, wl, state, batches, run_root)
        self.warned = [str(w.message) for w in caught]

    def step(self) -> None:
        if self.kind != "plain_clip_grad_norm":
            super().step()
            return
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self.wl.loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        self.opt.step()

    def close(self) -> None:
        info: dict[str, Any] = {"steps": self.i, "warnings": self.warned}
        if self.scope is not None and not self.scope.closed:
            disabled = bool(getattr(self.scope, "_disabled", False))
            self.scope.close()
            events = read_events(self.scope.run_dir / rundir.EVENTS)
            actions = Counter(
                ":".join(str(e[k]) for k in ("remedy", "action") if k in e)
                for e in events
                if e.get("event") == "remedy"
            )
            clipped = [
                e for e in events if e.get("event") == "remedy" and e.get("action") == "clipped"
            ]
            info.update(
                disabled=disabled,
                internal_errors=[
                    e.get("error") for e in events if e.get("event") == "internal_error"
                ],
                remedy_actions=dict(actions),
                clipped_steps=sum(int(e["clipped_steps"]) for e in clipped),
                findings=sorted(f"{f['kind']}@{f.get('layer')}" for f in self.scope.findings),
                acted_on=sum(bool(f.get("remedies")) for f in self.scope.findings),
            )
        RemedyVariant.report[self.kind] = info
        RemedyVariant.weights[self.kind] = [p.detach().clone() for p in self.model.parameters()]
        super().close()


def read_events(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def measure(wl: Workload, rounds: int, block: int) -> dict[str, Any]:
    RemedyVariant.report.clear()
    RemedyVariant.weights.clear()
    res = overhead.run_as(RemedyVariant, wl, VARIANTS, rounds, block)
    times = res["block_seconds"]
    res["vs_default"] = {k: overhead.paired(times[k], times[BASE]) for k in VARIANTS}
    res["clip_grad_norm_vs_plain"] = overhead.paired(times["plain_clip_grad_norm"], times["plain"])
    res["scopes"] = dict(RemedyVariant.report)
    w = RemedyVariant.weights
    # with dropout (the transformer) each variant draws from the shared global RNG in a
    # different order, so its weights differ whatever gradscope does: no comparison there
    has_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in wl.build().modules())
    res["same_weights"] = (
        None
        if has_dropout
        else {f"{k}={ref}": max_diff(w[k], w[ref]) for k, ref in SAME_AS.items()}
    )
    RemedyVariant.weights.clear()
    return res


# -- reporting ----------------------------------------------------------------------------------
def fmt(s: dict[str, Any]) -> str:
    return f"{s['ratio']:.3f}× ({s['ratio_p25']:.3f}–{s['ratio_p75']:.3f})"


INTRO = (
    "Every gradscope variant is `gradscope.watch(model, opt, quiet=True)` with its defaults "
    "(gradient norms every step, activation statistics and update ratios every 10th step, "
    "TensorBoard on) plus at most one remedy: `default` has none; `clip_norm` is "
    '`clip="norm:1.0"`; `clip_autoclip` `clip="autoclip"` (10th percentile of every norm '
    'seen, kept sorted on the device); `clip_autoclip_1000` `clip="autoclip:history=1000"`; '
    '`clip_agc` `clip="agc:0.01"` (unit-wise, last layer left out); `clip_zclip` '
    '`clip="zclip"`; `clip_zclip_per_layer` `clip="zclip:per_layer"`; `guard` `guard=True`; '
    '`swap_recycle` `swap="relu->leaky_relu:0.01", recycle=True`. `plain_clip_grad_norm` is '
    f"no gradscope and `torch.nn.utils.clip_grad_norm_(model.parameters(), {MAX_NORM})` before "
    "each `optimizer.step()`: the clipping a user writes today. A remedy's own cost is its "
    "ratio to `default` (same recording, no remedy); `clip_grad_norm_`'s is its ratio to "
    "`plain`."
)

SHORT = {
    "clip_norm": "norm:1.0",
    "clip_autoclip": "autoclip",
    "clip_autoclip_1000": "autoclip:history=1000",
    "clip_agc": "agc:0.01",
    "clip_zclip": "zclip",
    "clip_zclip_per_layer": "zclip:per_layer",
    "guard": "guard",
    "swap_recycle": "swap+recycle",
}


def reading(results: dict[str, Any], block: int) -> str:
    steps = {wl: res["scopes"].get("clip_autoclip", {}).get("steps") for wl, res in results.items()}
    held = ", ".join(f"{wl} {n}" for wl, n in steps.items() if n)
    return (
        "**Reading these numbers.** The runs are healthy: no gradient is non-finite, so "
        "`guard` never skips a step and what it adds is its per-step check (a finiteness "
        "test of the norms gradscope already computes, read on the host: free on the CPU, a "
        "device synchronisation per step on a GPU). **The GPU cost of that sync is not "
        "measured here** (this machine has no GPU). `swap_recycle` finds nothing to act on "
        "(see the scope table), so its cost is the extra diagnosis: with `swap=` or `recycle=` "
        "on, gradscope copies the sampled statistics to the host and runs its rules at every "
        "activation sample (every 10th step) instead of at each flush (every 100th), and "
        "`recycle` keeps per-unit dead masks. The clippers run on the device with no host "
        "read; their cost is a few small tensor operations per step plus one multiply of every "
        "gradient (AGC: two norms per parameter tensor and a multiply). Whole-history AutoClip "
        "grows with the run: its sorted history holds every step's norm (capacity doubling), "
        f"so each insert touches O(steps) elements; by the end of this run it held {held} "
        "norms (warm-up included), and the median block is the middle of that. The "
        "`clip_*` variants change the training trajectory (they clip), which does not change "
        "the work per step on these dense models. The ratios are paired within a round, so "
        "slow drift on the machine (other processes, such as a test suite, may run at the "
        "same time on this 2-core VM) hits both blocks of a pair; process CPU time excludes time "
        "spent waiting, but not the slowdown of shared caches. If a p25–p75 spread is wider "
        "than a difference, that difference is not settled by this run."
        + (
            " Blocks are shorter than `flush_every` in a quick run, so nothing here is a "
            "measurement."
            if block < BLOCK
            else ""
        )
    )


def scope_line(wl: str, kind: str, info: dict[str, Any]) -> str:
    acts = ", ".join(f"{k} {v}" for k, v in sorted(info.get("remedy_actions", {}).items()))
    clipped = info.get("clipped_steps")
    steps = info.get("steps", 0)
    clip_txt = f"{clipped}/{steps}" if kind.startswith("clip_") else "—"
    finds = ", ".join(info.get("findings", [])) or "none"
    errs = "; ".join(str(e) for e in info.get("internal_errors", []))
    bad = ("**disabled** " if info.get("disabled") else "") + (f"**{errs}**" if errs else "")
    warned = "; ".join(w.split(";")[0] for w in info.get("warnings", [])) or "—"
    return (
        f"| {wl} | {kind} | {clip_txt} | {acts or '—'} | {finds} | "
        f"{info.get('acted_on', 0)} | {warned} | {bad or 'none'} |"
    )


def source_state() -> str:
    """The git commit of the gradscope source measured, and whether gradscope/ differs from it
    (the package is installed editable: the working tree is what runs)."""
    root = HERE.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "gradscope")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (", with uncommitted changes under gradscope/" if dirty else "")


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    head = overhead.provenance(
        meta,
        results,
        "quick smoke run (a few short blocks)",
        "ratio = median over rounds of (variant block / reference block in the same round), "
        "in brackets the p25–p75 of those paired ratios",
    )
    source = f"- gradscope source: {meta['source_start']}"
    if meta["source_end"] != meta["source_start"]:
        source += (
            f" at the start, **{meta['source_end']} at the end** (the source changed "
            "during the run; modules were imported at the start)"
        )
    head.insert(len(head) - 1, source)
    lines = [
        SECTION,
        "",
        *head,
        INTRO,
        "",
        "Each remedy × `default` (its own cost), and `clip_grad_norm_` × `plain`:",
        "",
        "| workload | `clip_grad_norm_` × plain | "
        + " | ".join(f"`{SHORT[k]}`" for k in REMEDIES)
        + " |",
        "|---|" + "--:|" * (len(REMEDIES) + 1),
    ]
    for wl, res in results.items():
        v = res["vs_default"]
        lines.append(
            f"| {wl} | {fmt(res['clip_grad_norm_vs_plain'])} | "
            + " | ".join(fmt(v[k]) for k in REMEDIES)
            + " |"
        )
    lines += [
        "",
        "All variants:",
        "",
        "| workload | variant | ms/step (median) | × plain | × `default` |",
        "|---|---|--:|--:|--:|",
    ]
    for wl, res in results.items():
        for kind, s in res["summary"].items():
            lines.append(
                f"| {wl} | {kind} | {s['ms_per_step']:.2f} | {fmt(s)} | "
                f"{fmt(res['vs_default'][kind])} |"
            )
    lines += [
        "",
        "What each scope did over its whole run (warm-up included): steps a clipper "
        "changed (its `clipped` events; steps with a clip coefficient below 1), remedy "
        "events, findings, findings a remedy acted on, warnings at `watch()`, internal "
        "errors:",
        "",
        "| workload | variant | steps clipped | remedy events | findings | acted on | "
        "warnings | internal errors |",
        "|---|---|--:|---|---|--:|---|---|",
    ]
    for wl, res in results.items():
        for kind in VARIANTS:
            info = res["scopes"].get(kind, {})
            if VARIANTS[kind] is not None:
                lines.append(scope_line(wl, kind, info))
    same = {wl: res["same_weights"] for wl, res in results.items()}
    lines += [
        "",
        "Same training? Largest absolute difference between the final weights of "
        "two variants (each fed the same batches from the same initial weights; "
        "0 = bit-identical). The transformer has dropout, which draws from the global RNG "
        "in each variant's turn, so its variants are not comparable.",
        "",
        "| workload | " + " | ".join(f"`{k}` vs `{r}`" for k, r in SAME_AS.items()) + " |",
        "|---|" + "--:|" * len(SAME_AS),
    ]
    for wl, d in same.items():
        cells = (
            ["—"] * len(SAME_AS)
            if d is None
            else [f"{d[f'{k}={r}']:.3g}" for k, r in SAME_AS.items()]
        )
        lines.append(f"| {wl} | " + " | ".join(cells) + " |")
    lines += ["", reading(results, meta["block"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args, plan, block = overhead.parse_plan(
        __doc__, argv, ROUNDS, QUICK_ROUNDS, QUICK_BLOCK, HERE / "results" / "remedies.json"
    )
    meta = overhead.run_meta(
        "remedies.py",
        argv,
        args.quick,
        block,
        variants=VARIANTS,
        loadavg_start=os.getloadavg(),
        source_start=source_state(),
    )
    started = time.monotonic()
    results: dict[str, Any] = {}
    for name, rounds in plan.items():
        print(f"{name}: {rounds} rounds x {len(VARIANTS)} variants x {block} steps", flush=True)
        t0 = time.monotonic()
        results[name] = {"rounds": rounds, **measure(WORKLOADS[name], rounds, block)}
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
    meta["loadavg_end"] = os.getloadavg()
    meta["source_end"] = source_state()
    meta["seconds"] = round(time.monotonic() - started, 1)

    section = render(meta, results)
    print("\n" + section)
    replace_section(args.out, section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"meta": meta, "workloads": results}, indent=2, default=str) + "\n"
    )
    print(f"wrote {args.out} and {args.json} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
