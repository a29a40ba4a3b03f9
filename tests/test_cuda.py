"""On a GPU the step path never synchronises with the host; only flushes do.

Skipped (with the reason) where no CUDA device is present, as on CI.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_no_host_sync_between_flushes(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    scope = gradscope.watch(model, opt, out=out, flush_every=20, flush_secs=1e9,
                            activation_every=3)
    flush = scope._flush
    flushes = []

    def flush_without_debug_mode():  # the one place a host transfer is allowed
        torch.cuda.set_sync_debug_mode("default")
        try:
            flush()
            flushes.append(scope.steps)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    scope._flush = flush_without_debug_mode
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any other sync raises
        for _ in range(45):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        scope.close()
    assert len(flushes) == 2  # every 20 steps; the rest of the 45 at close
    run = scope.load()
    assert run.meta["steps"] == 45 and len(run.wide("grad_norm")) == 45
    assert list(run.wide("act_dead_fraction").index)[:3] == [0, 3, 6]
