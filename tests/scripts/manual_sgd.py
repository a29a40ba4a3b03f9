"""Hand-written SGD, no optimizer object: each backward pass is a step."""

import torch
from torch import nn

STEPS = 6

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 1))
x, y = torch.randn(24, 5), torch.randn(24, 1)
lr = 0.05
for step in range(STEPS):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None
    print(f"step {step} loss {loss.item():.5f}")
