"""Gradient accumulation: 4 micro-batches per optimizer.step()."""

import torch
from torch import nn

STEPS, MICRO = 5, 4

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(STEPS * MICRO * 8, 6), torch.randn(STEPS * MICRO * 8, 1)
batches = list(zip(x.split(8), y.split(8)))
opt.zero_grad()
total = 0.0
for i, (xb, yb) in enumerate(batches):
    loss = nn.functional.mse_loss(model(xb), yb) / MICRO
    loss.backward()
    total += loss.item()
    if (i + 1) % MICRO == 0:
        opt.step()
        opt.zero_grad()
        print(f"step {i // MICRO} loss {total:.5f}")
        total = 0.0
