"""A training loop that passes through every entry point of gradscope's guard (tests/test_guard.py):
module forward (and forward-pre: the root owns a parameter), output-gradient and tracer hooks,
backward, GradScaler, the script's own clip_grad_norm_, optimizer hooks, torch.save, a process
group destroyed, an explicit flush. Run as a script it prints one line per step and a digest of
the final weights, and ends as ``sys.argv[1]`` says."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _scaler() -> Any:
    """A GradScaler on the CPU (torch >= 2.3); None before."""
    cls = getattr(torch.amp, "GradScaler", None)
    try:
        return cls("cpu", init_scale=2.0**8) if cls is not None else None
    except (RuntimeError, TypeError):
        return None


HAS_SCALER = _scaler() is not None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))  # owned by the root: a forward-pre hook too
        self.body = nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain


def train(
    watch: Callable[[nn.Module], Any] | None = None,
    steps: int = 6,
    say: Callable[[str], None] = print,
    stop_at: int | None = None,
) -> tuple[Any, Net]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = _scaler()
    scope = watch(model) if watch is not None else None
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        say(f"step {step} loss {loss.item():.8f} norm {norm.item():.8f}")
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == 2 and scope is not None:
            scope.flush()
    buf = io.BytesIO()
    torch.save(model, buf)
    say(f"saved {len(buf.getvalue()) > 0}")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        dist.destroy_process_group()
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()
    say(f"weights {digest[:16]}")
    return scope, model


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    watch = None
    if mode == "watch-unclosed":  # a handle never closed: the interpreter's exit closes it
        import gradscope

        def watch(m: nn.Module) -> Any:
            return gradscope.watch(
                m,
                out=sys.argv[2],
                name="run",
                flush_every=2,
                activation_every=1,
                trace_nonfinite="always",
                report=False,
            )

    train(watch, say=lambda line: print(line, flush=True), stop_at=3 if mode == "sigterm" else None)
