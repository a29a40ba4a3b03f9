"""GPU figures: gradscope's overhead and its remedies' overhead on one CUDA device.

Wall time per step (``torch.cuda.synchronize()`` at the end of each block), interleaved
variants in a shuffled order each round, median over rounds, as a ratio to ``plain``.
Run on a machine with a GPU: ``python benchmarks/gpu.py [--rounds N] [--json PATH]``.
The workloads are overhead.py's MLP and TinyGPT, moved to the GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead

import gradscope

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "plain_clip_grad_norm": None,
    "default": {},
    "clip_norm": {"clip": "norm:1.0"},
    "clip_autoclip": {"clip": "autoclip"},
    "clip_agc": {"clip": "agc:0.01"},
    "clip_zclip": {"clip": "zclip"},
    "clip_zclip_per_layer": {"clip": "zclip:per_layer"},
    "guard": {"guard": True},
    "swap_recycle": {"swap": "relu->leaky_relu:0.2", "recycle": True},
}


def workloads(device: str) -> dict[str, tuple[nn.Module, Any, Any]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (128,), generator=gen).to(device)
    toks = torch.randint(0, 256, (16, 65), generator=gen).to(device)
    return {
        "mlp": (overhead.mlp, lambda m: nn.functional.cross_entropy(m(x), y), "sgd"),
        "transformer": (
            overhead.TinyGPT,
            lambda m: overhead.lm_loss(m(toks[:, :-1]), toks[:, 1:]),
            "adamw",
        ),
    }


def block(
    name: str,
    spec: dict[str, Any] | None,
    build: Any,
    loss_fn: Any,
    opt_kind: str,
    steps: int,
    out: str,
) -> float:
    torch.manual_seed(0)
    model = build().cuda()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if opt_kind == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=3e-4)
    )
    scope = gradscope.watch(model, opt, out=out, quiet=True, **spec) if spec is not None else None
    try:
        for _ in range(5):  # warm-up: allocations, cuBLAS handles
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            if name == "plain_clip_grad_norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps
    finally:
        if scope is not None:
            scope.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = tempfile.mkdtemp()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps": args.steps,
        "workloads": {},
    }
    for wl, (build, loss_fn, opt_kind) in workloads("cuda").items():
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS)
            random.Random(r).shuffle(order)
            for name in order:
                times[name].append(
                    block(name, VARIANTS[name], build, loss_fn, opt_kind, args.steps, out)
                )
        med = {k: statistics.median(v) for k, v in times.items()}
        results["workloads"][wl] = {
            k: {"ms_per_step": med[k] * 1e3, "x_plain": med[k] / med["plain"]} for k in med
        }
        print(wl, json.dumps(results["workloads"][wl], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
