"""A script that watches its model itself: ``self_watch.py OUT`` (gradscope.watch(out=OUT))."""

import sys

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
with gradscope.watch(model, out=sys.argv[1], name="own", quiet=True) as scope:
    for step in range(3):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.5f}")
print("steps", scope.steps)
