"""gradscope side by side with what users run today to watch their gradients: CPU time per
training step against the same training with nothing watching it.

Timing reuses benchmarks/overhead.py: its workloads, its interleaved runner (one block of every
variant per round, shuffled, process CPU time, one torch thread) and its paired ratios; the
``detect_anomaly`` variant is benchmarks/tracing.py's. The variants: ``plain``; ``norm_floor``
and ``naive_loop`` (overhead.py's: one ``torch._foreach_norm`` per step, and
``p.grad.norm().item()`` per parameter); ``default``, ``act_every_step`` and ``always_trace``
(``gradscope.watch`` with its defaults, with activation statistics every step, and with the
non-finite tracer on at every step); ``wandb_100`` and ``wandb_every_step``
(``wandb.watch(model, log="all", log_freq=100 / 1)`` in an offline run of its own, with
``run.log({"loss": ...})`` every step); ``detect_anomaly`` (every step inside
``torch.autograd.detect_anomaly()``). A peer that is not installed is skipped. See
benchmarks/README.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # already there when run as a script
    sys.path.insert(0, str(HERE))

import overhead  # noqa: E402
import tracing  # noqa: E402
from overhead import WORKLOADS  # noqa: E402

SECTION = "## Side by side with the peers (CPU)"
# wandb variant -> wandb.watch(log_freq=)
WANDB_FREQ = {"wandb_100": 100, "wandb_every_step": 1}
# variant -> gradscope.watch options (None: not watched)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "norm_floor": None,
    "naive_loop": None,
    "default": {},
    "act_every_step": {"activation_every": 1, "update_every": 10},
    # the tracer that names the first module to make a NaN/Inf, armed at every step instead of
    # only after a non-finite gradient norm or loss (the default, "auto")
    "always_trace": {"trace_nonfinite": "always"},
    "wandb_100": None,
    "wandb_every_step": None,
    "detect_anomaly": None,
}
PEERS = dict.fromkeys(WANDB_FREQ, "wandb")  # variant -> the package it needs
# the pivot table's columns: variant -> header
COLUMNS = {
    "default": "gradscope default",
    "act_every_step": "gradscope act every step",
    "always_trace": "gradscope always trace",
    "naive_loop": "naive `p.grad.norm().item()` loop",
    "norm_floor": "norm floor",
    "wandb_100": '`wandb.watch(log="all")` every 100',
    "wandb_every_step": '`wandb.watch(log="all")` every step',
    "detect_anomaly": "`detect_anomaly`",
}
# about an hour in all on a 2-core VM under another tenant's load (load average ~2; estimated
# from --quick step times): a round, one 100-step block of each variant, takes ~14 s (mlp),
# 90 s (cnn), 75 s (transformer), 2.5 min (many_modules) and 5.5 min (small_gpt), and each
# workload adds one warm-up block per variant (README: peers.py)
ROUNDS = {"mlp": 20, "cnn": 4, "transformer": 5, "many_modules": 4, "small_gpt": 3}
QUICK_ROUNDS, QUICK_BLOCK = 3, 5
NOT_INSTALLED = "not installed"
# workload -> variant -> why it is left out of that workload
NOT_RUN = {
    "many_modules": {
        "wandb_every_step": "2,002 histograms a step (every gradient and every parameter of "
        "1,001 tensors): a --quick run measured ~1 s of CPU in this process, 0.5 s in wandb's "
        "service and 6.7 MB of run directory per step (17x plain), so ~8 min and ~3 GB in a "
        "default run",
    },
}

wandb: Any = None  # the wandb module, once main() has imported it (None: not installed)


def wandb_env(home: str) -> dict[str, str]:
    """The environment wandb reads its settings from: offline runs, no git or code capture, no
    console capture, no error reports, every file under ``home``."""
    dirs = {f"WANDB_{d}DIR": home for d in ("", "CACHE_", "CONFIG_", "DATA_", "ARTIFACT_")}
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_ERROR_REPORTING": "false",
        **dirs,
    }


def import_wandb(home: str) -> Any:
    """``wandb``, set by :func:`wandb_env` (before the import) never to reach the network nor to
    write outside ``home``; None where it is not installed."""
    os.environ.update(wandb_env(home))
    try:
        import wandb as module
    except ImportError:
        return None
    return module


def helper_cpu() -> float:
    """CPU seconds (user + system) used so far by the processes this one started, all
    generations: wandb's service (``wandb-core``) and its system monitor do their work beside
    the training process, where ``time.process_time()`` does not see it. 0 without /proc."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return 0.0
    for d in entries:
        try:
            stat = (d / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        parent[int(d.name)] = int(fields[1])
        ticks[int(d.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    total, todo = 0, deque([os.getpid()])
    while todo:
        pid = todo.popleft()
        for child, ppid in parent.items():
            if ppid == pid:
                total += ticks[child]
                todo.append(child)
    return total / os.sysconf("SC_CLK_TCK")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- timing -------------------------------------------------------------------------------------
class PeersVariant(tracing.TracingVariant):
    """tracing.py's variant (its anomaly mode as ``detect_anomaly``), plus the wandb variants:
    each its own offline run, its model watched with ``log="all"`` at its ``log_freq``, the
    loss logged after every step as a script does; and the CPU time of the helper processes
    during each block."""

    anomaly_modes: ClassVar[dict[str, bool]] = {"detect_anomaly": True}
    # variant -> CPU seconds of the helper processes during each of its blocks (warm-up first)
    helper: ClassVar[dict[str, list[float]]] = {}
    # wandb variant -> bytes in its run directory when it finished
    written: ClassVar[dict[str, int]] = {}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.run: Any = None
        if self.kind in WANDB_FREQ:
            # two runs at once in one process: "create_new" (wandb >= 0.19.10)
            self.run = wandb.init(
                project="gradscope-peers", name=f"{self.wl.name}-{self.kind}", reinit="create_new"
            )
            self.run.watch(self.model, log="all", log_freq=WANDB_FREQ[self.kind])

    def step(self) -> None:
        super().step()
        if self.run is not None:
            assert self.loss is not None
            self.run.log({"loss": self.loss.item()})

    def block(self, steps: int) -> float:
        if self.run is not None:
            # wandb.watch's hooks log to the global `wandb.run`, which a "create_new" run does
            # not take: this variant's run is made the global one, as in a script with one run
            wandb.run = self.run
        before = helper_cpu()
        seconds = super().block(steps)
        PeersVariant.helper.setdefault(self.kind, []).append(helper_cpu() - before)
        return seconds

    def close(self) -> None:
        if self.run is not None:
            self.run.unwatch(self.model)
            self.run.finish()
            PeersVariant.written[self.kind] = dir_bytes(Path(self.run.dir).parent)
            self.run = None
        super().close()


def measure(
    wl: overhead.Workload, specs: dict[str, dict[str, Any] | None], rounds: int, block: int
) -> dict[str, Any]:
    PeersVariant.helper.clear()
    PeersVariant.written.clear()
    PeersVariant.nonfinite.clear()
    res = overhead.run_as(PeersVariant, wl, specs, rounds, block)
    res["helper_ms_per_step"] = {
        kind: 1000 * statistics.median(ts[1:] or ts) / block  # the warm-up block left out
        for kind, ts in PeersVariant.helper.items()
    }
    res["wandb_run_bytes"] = dict(PeersVariant.written)
    res["nonfinite_findings"] = dict(PeersVariant.nonfinite)
    return res


# -- reporting ----------------------------------------------------------------------------------
INTRO = (
    "Each variant trains its own copy of the model, from the same weights, on the same "
    "batches. `norm_floor`: one `torch._foreach_norm` over all gradients per step, kept on the "
    "device (the least any per-layer gradient monitor must do). `naive_loop`: "
    "`[p.grad.norm().item() for p in model.parameters()]` after each backward. `default`: "
    "`gradscope.watch(model, opt)`. `act_every_step`: the same with `activation_every=1, "
    'update_every=10`. `always_trace`: the same with `trace_nonfinite="always"` (every '
    "module's outputs and gradients checked for NaN/Inf at every step, not only after a "
    "non-finite gradient norm or loss). `wandb_100` / `wandb_every_step`: "
    '`run.watch(model, log="all", log_freq=100 / 1)` in an offline wandb run of its own, and '
    '`run.log({"loss": loss.item()})` after every step. `detect_anomaly`: every step inside '
    "`torch.autograd.detect_anomaly()`."
)
READING = (
    "**Reading these numbers.** The ratios count the CPU time of the training process only. "
    "wandb hands what it logs to a service process of its own (`wandb-core`, with a system "
    "monitor beside it), which serialises and writes it on another core: its CPU time per step "
    "during the same blocks is the *helper* column, not in the ratio (on a 2-core VM that "
    "other core is not free for the data loader or anything else). `wandb.watch` counts "
    "backward passes per parameter: at `log_freq=100` a 100-step block holds exactly one "
    "histogram of every gradient and every parameter (as it holds one gradscope flush), so "
    "that cost arrives in one step in 100; at `log_freq=1` it is paid at every step. "
    "`detect_anomaly` is a debugging mode (it records a traceback for every autograd node and "
    "checks every backward output for NaN), not a monitor meant to stay on. gradscope's runs "
    "are healthy, so `always_trace` pays for checking every step and never drops back to the "
    "cheap check. If a p25–p75 spread is wide, rerun that workload with more `--rounds` on a "
    "quiet machine."
)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def missing(res: dict[str, Any], kind: str) -> str:
    return "not run" if kind in res["not_run"] else NOT_INSTALLED


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    head = overhead.provenance(
        meta,
        results,
        "quick smoke run (blocks shorter than flush_every and log_freq=100)",
        "ratio = median over rounds of (variant block / `plain` block in the same round); "
        "spread = p25–p75 of those paired ratios",
    )
    peers = (
        f'wandb {meta["wandb"]} (offline, `reinit="create_new"`: one run per variant)'
        if meta["wandb"]
        else f"wandb {NOT_INSTALLED}: its variants were skipped"
    )
    lines = [SECTION, "", *head[:-1], f"- {peers}", "", INTRO, ""]
    lines += [
        "| workload | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "--:|" * len(COLUMNS),
    ]
    for wl, res in results.items():
        cells = [
            f"{res['summary'][k]['ratio']:.3f}×" if k in res["summary"] else missing(res, k)
            for k in COLUMNS
        ]
        lines.append(f"| {wl} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All variants (× plain: the median paired ratio; helper: the CPU time of the processes "
        "this one started, per step, during the same blocks, not in the ratio):",
        "",
        "| workload | variant | ms/step (median) | × plain (median) | p25–p75 | helper ms/step |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for wl, res in results.items():
        for kind in VARIANTS:
            s = res["summary"].get(kind)
            if s is None:
                lines.append(f"| {wl} | {kind} | {missing(res, kind)} | — | — | — |")
                continue
            lines.append(
                f"| {wl} | {kind} | {s['ms_per_step']:.2f} | {s['ratio']:.3f}× | "
                f"{s['ratio_p25']:.3f}–{s['ratio_p75']:.3f} | "
                f"{res['helper_ms_per_step'].get(kind, 0.0):.2f} |"
            )
    written = [
        f"{wl} {kind} {fmt_bytes(n)}"
        for wl, res in results.items()
        for kind, n in res["wandb_run_bytes"].items()
    ]
    if written:
        lines += ["", "wandb's offline run directories when finished: " + ", ".join(written) + "."]
    lines += [
        f"\n*Not run*, {wl} {kind}: {why}."
        for wl, res in results.items()
        for kind, why in res["not_run"].items()
    ]
    lines += tracing.nonfinite_warning(results, "`always_trace` is")
    lines += ["", READING]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    global wandb
    args, plan, block = overhead.parse_plan(
        __doc__, argv, ROUNDS, QUICK_ROUNDS, QUICK_BLOCK, HERE / "results" / "peers.json"
    )
    home = tempfile.mkdtemp(prefix="gradscope-peers-wandb-")  # every wandb file, deleted below
    try:
        wandb = import_wandb(home)
        absent = [k for k, pkg in PEERS.items() if pkg == "wandb" and wandb is None]
        if absent:  # one line, then "not installed" rows
            print(
                f"wandb is {NOT_INSTALLED}: skipping {', '.join(absent)} (pip install -e .[bench])"
            )
        meta = overhead.run_meta(
            "peers.py",
            argv,
            args.quick,
            block,
            variants=VARIANTS,
            wandb=None if wandb is None else metadata.version("wandb"),
            loadavg_start=os.getloadavg(),
        )
        results: dict[str, Any] = {}
        for name, rounds in plan.items():
            not_run = {k: v for k, v in NOT_RUN.get(name, {}).items() if k not in absent}
            specs = {k: v for k, v in VARIANTS.items() if k not in absent and k not in not_run}
            print(f"{name}: {rounds} rounds x {len(specs)} variants x {block} steps", flush=True)
            results[name] = {
                "rounds": rounds,
                **measure(WORKLOADS[name], specs, rounds, block),
                "not_installed": absent,
                "not_run": not_run,
            }
        meta["loadavg_end"] = os.getloadavg()
    finally:
        if wandb is not None:
            wandb.teardown()  # stop the service before its files go
        shutil.rmtree(home, ignore_errors=True)

    section = render(meta, results)
    overhead.publish(section, args.out, args.json, {"meta": meta, "workloads": results})


if __name__ == "__main__":
    main()
