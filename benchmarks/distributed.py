"""What watching costs on several processes: DDP and FSDP2 on 2 CPU ranks (gloo).

    python benchmarks/distributed.py [--rounds 8] [--steps 100]

Starts itself under torchrun (2 ranks). Each rank trains a 512-1024-1024-10 ReLU MLP; rounds
alternate plain and watched (default configuration, ``flush_every=50`` so each watched round
holds two flush exchanges), A/B interleaved. Reported: rank 0's CPU time per step (median over
rounds; ``time.process_time``, so the other rank's load does not count), the ratio, and the
wall time of one flush exchange (the three collectives plus the host work around them).
On this shared 2-core machine the ranks compete for the cores: read the ratio, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _round(mode: str, steps: int, watched: bool, out: str, exchange: list[float]) -> float:
    import gradscope
    from gradscope import distributed

    model = _model(mode)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(64, 512, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    scope = (
        gradscope.watch(model, out=out, flush_every=50, quiet=True, report=False, tensorboard=False)
        if watched
        else None
    )
    original = distributed.Reducer.exchange

    def timed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            exchange.append(time.perf_counter() - t0)

    distributed.Reducer.exchange = timed  # type: ignore[method-assign]
    try:
        dist.barrier()
        t0 = time.process_time()
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        cpu = time.process_time() - t0
    finally:
        distributed.Reducer.exchange = original  # type: ignore[method-assign]
    if scope is not None:
        scope.close()
    return cpu / steps


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("ddp", "fsdp2"):
            plain, watched, exchange = [], [], []
            _round(mode, 10, True, out, [])  # warm-up: imports, the first group
            for _ in range(args.rounds):
                plain.append(_round(mode, args.steps, False, out, []))
                watched.append(_round(mode, args.steps, True, out, exchange))
            p, w = statistics.median(plain), statistics.median(watched)
            results[mode] = {
                "plain_ms": p * 1e3,
                "watched_ms": w * 1e3,
                "ratio": w / p,
                "exchange_ms": statistics.median(exchange) * 1e3,
                "exchanges": len(exchange),
            }
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            "--rounds",
            str(args.rounds),
            "--steps",
            str(args.steps),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    results = json.loads(line)
    print(
        "| setup | plain CPU ms/step | watched CPU ms/step | ratio | one flush exchange (wall ms) |"
    )
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode}, 2 ranks, gloo | {r['plain_ms']:.1f} | {r['watched_ms']:.1f} | "
            f"{r['ratio']:.3f} | {r['exchange_ms']:.1f} (median of {r['exchanges']}) |"
        )


if __name__ == "__main__":
    main()
