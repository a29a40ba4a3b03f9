"""CPU overhead of ``gradscope.watch`` on three small reference workloads.

Each variant (plain, gradscope defaults, activation stats every step, a hand-written grad-norm
loop) has its own model copy and optimizer from one initial state_dict. Each round runs one block
of every variant in shuffled order, timed in *process* CPU time (gradscope's background threads
count); ratios to ``plain`` are paired within a round. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradscope

HERE = Path(__file__).resolve().parent
SECTION = "## Watch overhead (CPU)"
NEVER = 10**9  # a sampling period longer than any run: that probe is off (after step 0)
# variant -> gradscope.watch options (None: not watched)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "norm_floor": None,
    "default": {},
    # activation statistics every step; update ratios stay at their default period
    "act_every_step": {"activation_every": 1, "update_every": 10},
    "naive_loop": None,
}
# --breakdown: the default configuration built up piece by piece
BREAKDOWN: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "norm_floor": None,
    "grad_norms": {"activation_every": NEVER, "update_every": NEVER, "tensorboard": False},
    "+activations": {"update_every": NEVER, "tensorboard": False},
    "+update_ratios": {"tensorboard": False},
    "+tensorboard (=default)": {},
}
# --functional: a model whose activations are all functional (F.relu), the interception on
# (the default) and off, at the default sampling period and at every step
FUNCTIONAL: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "default": {},
    "default (functional off)": {"functional_activations": False},
    "act_every_step": {"activation_every": 1, "update_every": 10},
    "act_every_step (functional off)": {
        "activation_every": 1,
        "update_every": 10,
        "functional_activations": False,
    },
}
FUNCTIONAL_SECTION = "## Functional activations: the interception's cost (CPU)"
FUNCTIONAL_INTRO = (
    "pytorch/examples' MNIST net (`F.relu` after each conv and fc1, `F.max_pool2d`, dropout, "
    "`F.log_softmax`; batch 32 of 1x28x28): no activation module at all, so every activation "
    "statistic comes from the `TorchFunctionMode` that `functional_activations=True` (the "
    "default) enters for the forward of sampled steps. `(functional off)`: the same without "
    "it (no activation statistics on this model). The difference between a pair is what the "
    "interception costs: every torch call of a sampled forward through the mode, and the "
    "statistics of the three `F.relu` sites."
)
# max whole-run ratio to plain; "default" is judged against the floor of the same run instead
TARGETS = {"default": 1.02, "act_every_step": 1.10}
FLOOR_MARGIN = 0.02  # default <= norm_floor + this (issue: "at most 2 points above the floor")
BREAKDOWN_SECTION = "## Where the default configuration's cost goes (CPU)"
BLOCK = 100  # = gradscope's default flush_every: every timed block holds exactly one flush
SEED = 0

Batch = tuple[torch.Tensor, torch.Tensor]


# -- workloads ----------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, pre-LN blocks, linear head."""

    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 128,
        n_heads: int = 4,
        n_blocks: int = 2,
        seq_len: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, dropout) for _ in range(n_blocks)))
        self.ln_f, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.drop(self.tok(idx) + self.pos(pos)))
        return self.head(self.ln_f(x))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class MnistNet(nn.Module):
    """pytorch/examples' mnist/main.py ``Net``: every activation is a function call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class _Residual(nn.Module):
    """``x + f(x)``: a parameter-free container (not a watched layer)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class ManyModules(nn.Module):
    """1,000 small ``Linear(16, 16)`` layers (no bias) in 500 residual blocks
    ``x + tanh(W2 W1 x)`` (500 ``Tanh``) and a 10-way head: 1,001 weight tensors of 16x16 and
    one bias, so the cost of watching it is all per-module and per-tensor bookkeeping, not bytes
    (a GPT-2 has ~150 modules with parameters, a ViT-B ~200). Residual, so that it trains
    healthily: a plain 1,000-layer stack would rightly be diagnosed (vanishing gradients), and
    the benchmark would time the diagnosis of a sick run instead of watching a healthy one."""

    def __init__(self, n: int = 1000, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *(
                _Residual(
                    nn.Sequential(
                        nn.Linear(width, width, bias=False),
                        nn.Linear(width, width, bias=False),
                        nn.Tanh(),
                    )
                )
                for _ in range(n // 2)
            )
        )
        self.head = nn.Linear(width, 10)
        with torch.no_grad():  # each branch starts small: the sum of 500 stays near its input
            for block in self.body:
                block.f[1].weight.mul_(1 / math.sqrt(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def small_gpt() -> nn.Module:
    """nanoGPT-like, ~10.7M parameters: vocab 256, d_model 384, 6 heads, 6 pre-LN blocks."""
    return TinyGPT(vocab=256, d_model=384, n_heads=6, n_blocks=6, seq_len=64)


def image_batches(shape: tuple[int, ...], n: int, gen: torch.Generator) -> list[Batch]:
    return [
        (torch.randn(shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen))
        for _ in range(n)
    ]


def token_batches(n: int, gen: torch.Generator, batch: int = 16) -> list[Batch]:
    seqs = [torch.randint(0, 256, (batch, 65), generator=gen) for _ in range(n)]
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]  # next-token targets


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass(frozen=True)
class Workload:
    """A reference training setup; ``batches`` builds a fixed pool of synthetic batches."""

    name: str
    build: Callable[[], nn.Module]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    batches: Callable[[torch.Generator], list[Batch]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rounds: int  # default number of rounds


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


WORKLOADS = {
    "mlp": Workload(
        "mlp", mlp, sgd, lambda g: image_batches((128, 784), 8, g), F.cross_entropy, rounds=30
    ),
    "cnn": Workload(
        "cnn", cnn, sgd, lambda g: image_batches((128, 1, 28, 28), 8, g), F.cross_entropy, rounds=6
    ),  # ~10x slower per step than the MLP
    "transformer": Workload(
        "transformer",
        TinyGPT,
        lambda ps: torch.optim.AdamW(ps, lr=3e-4),
        lambda g: token_batches(8, g),
        lm_loss,
        rounds=10,
    ),
    "many_modules": Workload(
        "many_modules",
        ManyModules,
        sgd,
        lambda g: image_batches((32, 16), 8, g),
        F.cross_entropy,
        rounds=6,
    ),
    "small_gpt": Workload(
        "small_gpt",
        small_gpt,
        lambda ps: torch.optim.AdamW(ps, lr=3e-4),
        lambda g: token_batches(8, g, batch=4),
        lm_loss,
        rounds=3,  # ~25 s a block: 3 rounds of 5 variants is ~8 minutes
    ),
}
FUNCTIONAL_WORKLOADS = {  # --functional
    "mnist": Workload(
        "mnist",
        MnistNet,
        lambda ps: torch.optim.Adadelta(ps, lr=1.0),
        lambda g: image_batches((32, 1, 28, 28), 8, g),
        F.nll_loss,
        rounds=10,
    ),
}


# -- variants -----------------------------------------------------------------------------------
class Variant:
    """One model copy + optimizer (+ scope); ``block(n)`` trains n steps, returns CPU seconds."""

    def __init__(
        self,
        kind: str,
        options: dict[str, Any] | None,
        wl: Workload,
        state: dict[str, torch.Tensor],
        batches: list[Batch],
        run_root: str,
    ) -> None:
        self.kind, self.wl, self.batches, self.i = kind, wl, batches, 0
        self.model = wl.build()
        self.model.load_state_dict(state)
        self.model.train()
        self.opt = wl.optimizer(self.model.parameters())
        self.grad_norms: list[list[float]] = []  # naive_loop's record
        self.loss: torch.Tensor | None = None  # the last step's loss
        self.scope: gradscope.Scope | None = None
        if options is not None:
            safe = re.sub(r"[^\w.-]+", "_", kind)
            self.scope = gradscope.watch(
                self.model, self.opt, out=run_root, name=f"{wl.name}-{safe}", **options
            )

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self.wl.loss(self.model(x), y)
        loss.backward()
        self.loss = loss  # for a subclass that logs it (benchmarks/peers.py)
        if self.kind == "norm_floor":  # the least any per-layer monitor must do: read each
            # gradient once (one batched on-device norm per step, no host read, no bookkeeping)
            self.floor = torch._foreach_norm([p.grad for p in self.model.parameters()])
        if self.kind == "naive_loop":
            norms = [p.grad.norm().item() for p in self.model.parameters()]  # type: ignore[union-attr]
            self.grad_norms.append(norms)
        self.opt.step()

    def block(self, steps: int) -> float:
        gc.collect()  # garbage left by another variant is not charged to this one
        start = time.process_time()
        for _ in range(steps):
            self.step()
        return time.process_time() - start

    def close(self) -> None:
        if self.scope is not None:
            self.scope.close()


def run_workload(
    wl: Workload, specs: dict[str, dict[str, Any] | None], rounds: int, block: int, seed: int
) -> dict[str, Any]:
    """Warm up, then time ``rounds`` shuffled rounds; returns raw block times and a summary."""
    torch.manual_seed(seed)
    state = wl.build().state_dict()
    batches = wl.batches(torch.Generator().manual_seed(seed))
    run_root = tempfile.mkdtemp(prefix=f"gradscope-bench-{wl.name}-")
    rng = random.Random(seed)
    load_start = os.getloadavg()
    variants: dict[str, Variant] = {}
    try:
        for kind, options in specs.items():
            variants[kind] = Variant(kind, options, wl, state, batches, run_root)
        for v in variants.values():
            v.block(block)  # warm-up, not timed
        times: dict[str, list[float]] = {kind: [] for kind in specs}
        for r in range(rounds):
            order = list(specs)
            rng.shuffle(order)
            for kind in order:
                times[kind].append(variants[kind].block(block))
            if sys.stdout.isatty():
                print(f"  round {r + 1}/{rounds}", end="\r", flush=True)
    finally:
        for v in variants.values():
            v.close()
        shutil.rmtree(run_root, ignore_errors=True)
    return {
        "block_seconds": times,
        "summary": summarize(times, block),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def summarize(times: dict[str, list[float]], block: int) -> dict[str, dict[str, Any]]:
    """Per variant: median ms/step; ``total``, the whole-run ratio to ``plain`` (sum of its
    blocks over the sum of ``plain``'s: a flush or a sampled step counts wherever it falls,
    and the default flushes at most once in 5 s, so most 100-step blocks hold none); and the
    median and p25/p75 of the per-round paired ratios (``ratio``), the spread.

    Pass/fail: ``default`` against ``norm_floor`` + ``FLOOR_MARGIN`` when the floor ran,
    otherwise against ``TARGETS``; other variants against ``TARGETS``."""
    out: dict[str, dict[str, Any]] = {}
    plain_total = sum(times["plain"])
    floor = sum(times["norm_floor"]) / plain_total if "norm_floor" in times else None
    for kind, ts in times.items():
        ratios = [t / p for t, p in zip(ts, times["plain"])]
        p25, med, p75 = (float(q) for q in np.percentile(ratios, [25, 50, 75]))
        total = sum(ts) / plain_total
        target = TARGETS.get(kind)
        if kind == "default" and floor is not None:
            target = floor + FLOOR_MARGIN
        out[kind] = {
            "ms_per_step": 1000 * statistics.median(ts) / block,
            "total": total,
            "ratio": med,
            "ratio_p25": p25,
            "ratio_p75": p75,
            "target": target,
            "pass": None if target is None else total <= target,
        }
    return out


# -- reporting ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


INTRO = (
    "Targets: `default` ≤ `norm_floor` + 0.02 (at most 2 points above the floor, in the same "
    "run), `act_every_step` (activation stats every step) ≤ 1.10×. `norm_floor`: one "
    "`torch._foreach_norm` over all gradients per step, kept on the device: the work any "
    "per-layer gradient monitor cannot avoid. `naive_loop` (per-parameter "
    "`p.grad.norm().item()`, what users write today): no target, for comparison. Workloads: "
    "`many_modules` is 1,000 `Linear(16,16)` in 500 residual blocks with 500 `Tanh` (cost "
    "per module, not per byte); `small_gpt` a 10.7M-parameter nanoGPT-like model (6 blocks, "
    "d 384, batch 4 x 64 tokens)."
)
BREAKDOWN_INTRO = (
    "The default configuration built up one piece at a time: `grad_norms` records only what "
    "is taken every step (gradient norms, loss, non-finite checks, flushes to Parquet); "
    "`+activations` adds activation statistics and the backward signal every 10th step; "
    "`+update_ratios` adds update ratios, weight norms and max-abs gradients every 10th step; "
    "`+tensorboard` adds the TensorBoard sink, which makes it the default. `norm_floor` is one "
    "`torch._foreach_norm` over all gradients per step and nothing else."
)


def provenance(
    meta: dict[str, Any], results: dict[str, Any], quick_note: str, ratio_line: str
) -> list[str]:
    """The lines under a section title that say how, where and when it was measured."""

    def la(t: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.2f}" for x in t)

    return [
        f"Generated by `{meta['command']}` on {meta['date']}"
        + (f" — **{quick_note}, not a measurement**." if meta["quick"] else "."),
        "",
        f"- torch {meta['torch']}, gradscope {meta['gradscope']}, Python {meta['python']}, "
        f"{meta['torch_threads']} torch thread(s)",
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs)",
        f"- load average (1/5/15 min): start {la(meta['loadavg_start'])}, "
        f"end {la(meta['loadavg_end'])}",
        f"- block = {meta['block']} steps of process CPU time; rounds: "
        + ", ".join(f"{k} {v['rounds']}" for k, v in results.items()),
        f"- {ratio_line}",
        "",
    ]


def render(
    meta: dict[str, Any], results: dict[str, Any], section: str = SECTION, intro: str = INTRO
) -> str:
    """A RESULTS.md section: provenance, then one row per workload x variant."""
    lines = [
        section,
        "",
        *provenance(
            meta,
            results,
            "quick smoke run (blocks shorter than flush_every)",
            "× plain = the variant's CPU time over `plain`'s, summed over all rounds (what "
            "a run costs: flushes and sampled steps count wherever they fall); per round = "
            "median and p25–p75 of the per-round paired ratios (the spread)",
        ),
        intro,
        "",
        "| workload | variant | ms/step (median) | × plain | per round: median (p25–p75) "
        "| target | result |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for wl, res in results.items():
        for kind, s in res["summary"].items():
            target = "—" if s["target"] is None else f"≤ {s['target']:.3f}×"
            if kind == "default" and "norm_floor" in res["summary"] and s["target"] is not None:
                target += " (floor + 0.02)"
            verdict = "—" if s["pass"] is None else ("pass" if s["pass"] else "**FAIL**")
            total = s.get("total", s["ratio"])
            lines.append(
                f"| {wl} | {kind} | {s['ms_per_step']:.2f} | {total:.3f}× | "
                f"{s['ratio']:.3f}× ({s['ratio_p25']:.3f}–{s['ratio_p75']:.3f}) | {target} "
                f"| {verdict} |"
            )
    return "\n".join(lines) + "\n"


def replace_section(path: Path, section: str) -> None:
    """Write ``section`` into ``path``, replacing the old one with the same title (up to the
    next ``## ``)."""
    title = section.splitlines()[0]
    text = path.read_text(encoding="utf-8") if path.exists() else "# gradscope benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def publish(section: str, out: Path, json_path: Path, payload: dict[str, Any]) -> None:
    """Print a results section, write it into ``out`` (:func:`replace_section`) and the raw
    results to ``json_path``: how every benchmark here ends."""
    print("\n" + section)
    replace_section(out, section)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out} and {json_path}")


@contextlib.contextmanager
def using_variant(cls: type[Variant]) -> Iterator[None]:
    """Make :func:`run_workload` build ``cls`` (a Variant subclass; it looks ``Variant`` up at
    call time)."""
    global Variant
    saved = Variant
    Variant = cls  # type: ignore[misc]
    try:
        yield
    finally:
        Variant = saved  # type: ignore[misc]


def run_as(
    cls: type[Variant],
    wl: Workload,
    specs: dict[str, dict[str, Any] | None],
    rounds: int,
    block: int,
) -> dict[str, Any]:
    """:func:`run_workload` with ``cls`` (a Variant subclass) as the variant, and without this
    script's targets in the summary (they are for its own table)."""
    with using_variant(cls):
        res = run_workload(wl, specs, rounds, block, SEED)
    for s in res["summary"].values():
        s.pop("target", None)
        s.pop("pass", None)
    return res


def paired(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and p25/p75 of per-round ratios num[i] / den[i]."""
    ratios = [n / d for n, d in zip(num, den)]
    p25, med, p75 = (float(q) for q in np.percentile(ratios, [25, 50, 75]))
    return {"ratio": med, "ratio_p25": p25, "ratio_p75": p75}


def add_common_args(
    parser: argparse.ArgumentParser,
    rounds_help: str,
    quick_help: str,
    json_default: Path | None,
    json_help: str = "raw results",
) -> None:
    """``--workloads``, ``--rounds``, ``--quick``, ``--out`` and ``--json``, shared by every
    benchmark script here."""
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--rounds", type=int, help=rounds_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=json_default, help=json_help)


def checked_workloads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The workload names asked for (a usage error names any unknown one)."""
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return names


def parse_plan(
    doc: str,
    argv: list[str] | None,
    rounds: dict[str, int],
    quick_rounds: int,
    quick_block: int,
    json_default: Path,
) -> tuple[argparse.Namespace, dict[str, int], int]:
    """The command line of a benchmark with default rounds per workload (``rounds``): its
    arguments (:func:`add_common_args`), the rounds of each workload asked for, and the block
    size (``quick_block`` steps with ``--quick``, else :data:`BLOCK`). Sets one torch thread."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_args(
        parser,
        "rounds per workload (default: " + ", ".join(f"{k} {v}" for k, v in rounds.items()) + ")",
        f"smoke run: {quick_rounds} rounds of {quick_block} steps",
        json_default,
    )
    args = parser.parse_args(argv)
    names = checked_workloads(parser, args)
    torch.set_num_threads(1)
    plan = {n: args.rounds or (quick_rounds if args.quick else rounds[n]) for n in names}
    return args, plan, quick_block if args.quick else BLOCK


def run_meta(
    script: str, argv: list[str] | None, quick: bool, block: int, **extra: Any
) -> dict[str, Any]:
    """What a results section says about the machine and the run (call after setting the
    thread count)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": quick,
        "command": " ".join(["python", f"benchmarks/{script}", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "gradscope": gradscope.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "block": block,
        "seed": SEED,
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(
        parser,
        "rounds per workload (default: per workload)",
        "smoke run: 3 rounds of 10 steps",
        None,
        "raw results (default: results/<mode>.json)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="build the default configuration up piece by piece instead",
    )
    parser.add_argument(
        "--functional",
        action="store_true",
        help="the functional-activation interception on and off, on an MNIST net (F.relu)",
    )
    args = parser.parse_args(argv)
    specs = BREAKDOWN if args.breakdown else FUNCTIONAL if args.functional else VARIANTS
    mode = "breakdown" if args.breakdown else "functional" if args.functional else "overhead"
    json_path = args.json or HERE / "results" / f"{mode}.json"
    table = FUNCTIONAL_WORKLOADS if args.functional else WORKLOADS
    if args.functional:
        names = list(FUNCTIONAL_WORKLOADS)
        if args.rounds is not None and args.rounds < 1:
            parser.error("--rounds must be >= 1")
    else:
        names = checked_workloads(parser, args)

    torch.set_num_threads(1)
    block = 10 if args.quick else BLOCK
    meta = run_meta("overhead.py", argv, args.quick, block, loadavg_start=os.getloadavg())
    results: dict[str, Any] = {}
    for name in names:
        wl = table[name]
        rounds = args.rounds or (3 if args.quick else wl.rounds)
        print(f"{name}: {rounds} rounds x {len(specs)} variants x {block} steps", flush=True)
        results[name] = {"rounds": rounds, **run_workload(wl, specs, rounds, block, SEED)}
    meta["loadavg_end"] = os.getloadavg()

    if args.breakdown:
        section = render(meta, results, BREAKDOWN_SECTION, BREAKDOWN_INTRO)
    elif args.functional:
        section = render(meta, results, FUNCTIONAL_SECTION, FUNCTIONAL_INTRO)
    else:
        section = render(meta, results)
    publish(section, args.out, json_path, {"meta": meta, "workloads": results})


if __name__ == "__main__":
    main()
