"""The script clips its own (large) gradients with clip_grad_norm_."""

import torch
from torch import nn

MAX_NORM, STEPS = 1.0, 5

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(32, 4) * 10
y = torch.randn(32, 1) * 100
for step in range(STEPS):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    total = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    print(f"step {step} loss {loss.item():.4f} norm before clip {total.item():.4f}")
