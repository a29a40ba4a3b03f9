"""Every step's gradients are NaN: guard= skips them, then stops the run."""

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(20):
    opt.zero_grad()
    (model(torch.randn(8, 4)).sum() * float("nan")).backward()
    opt.step()
    print("step", step, flush=True)
print("never reached")
