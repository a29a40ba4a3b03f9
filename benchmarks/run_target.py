"""The training script `benchmarks/run.py` times: a plain loop that knows nothing of gradscope,
unless ``--watch`` makes it call ``gradscope.watch`` itself. Prints one JSON line: the process
CPU seconds of the timed steps (after a warm-up that includes gradscope's first flush), so
interpreter start-up and first-use imports are not counted.

Workloads:
  lstmcell  an ``nn.LSTMCell`` called once per time step (64 steps) in a Python loop, then a
            linear head: ~130 module calls per training step, the per-call hook cost's worst
            case the `gradscope run` issue names;
  mlp       benchmarks/overhead.py's MLP (784-512-256-10, batch 128): few, larger calls;
  tiny      a 32-64-10 MLP at batch 16, for benchmarks/startup.py: with ``--steps 2 --warmup 0``
            the process is almost all fixed cost (interpreter, imports, attaching, closing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn


class CellRNN(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(d_in, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d_in]
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def build(workload: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if workload == "tiny":
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        return model, torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    if workload == "lstmcell":
        return (
            CellRNN(),
            torch.randn(16, 64, 16, generator=g),
            torch.randint(0, 4, (16,), generator=g),
        )
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    return model, torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=["lstmcell", "mlp", "tiny"], required=True)
    parser.add_argument("--steps", type=int, default=100)
    # past gradscope's first flush (flush_every=100), which imports pandas and pyarrow once:
    # a start-up cost, not a per-step one
    parser.add_argument("--warmup", type=int, default=110)
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--out", help="--watch: the output root (default: a new temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y = build(args.workload)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scope = None
    if args.watch:
        import gradscope

        scope = gradscope.watch(
            model, out=args.out or tempfile.mkdtemp(prefix="gs-bench-"), quiet=True
        )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    start = time.process_time()
    for _ in range(args.steps):
        step()
    cpu = time.process_time() - start
    if scope is not None:
        scope.close()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    print(json.dumps({"cpu": cpu, "steps": args.steps, "checksum": checksum}))


if __name__ == "__main__":
    main()
