"""The README's first example: watch a small training loop, then read the records back."""

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(256, 20), torch.randint(0, 2, (256,))

with gradscope.watch(model, out="reports", name="quickstart") as scope:
    for _ in range(100):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

run = scope.load()  # the run directory, read back with pandas
print(f"{run.meta['steps']} steps, status {run.meta['status']}")
fmt = "{:.3g}".format
print(run.wide("grad_norm").loc[[0, 50, 99]].to_string(float_format=fmt))
print(run.wide("update_ratio").loc[[0, 40, 80]].to_string(float_format=fmt))
print(run.wide("act_dead_fraction").loc[[0, 50, 90]].to_string(float_format=fmt))
