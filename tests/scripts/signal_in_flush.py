"""Trains 60 steps (flush_every=20) and sends itself a signal from inside the N-th Parquet
write: ``signal_in_flush.py SIGTERM|SIGINT N``. Every step must still be on disk."""

from __future__ import annotations

import os
import signal
import sys

import pyarrow.parquet as pq
import torch
from torch import nn

sig = getattr(signal, sys.argv[1])
at_call = int(sys.argv[2])
real = pq.write_table
calls = [0]


def write_table(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at_call:
        os.kill(os.getpid(), sig)  # the handler runs here, in the middle of the flush
    return real(*args, **kwargs)


pq.write_table = write_table
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(60):
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
print("done", flush=True)
