"""LBFGS: each optimizer.step(closure) runs several forward/backward passes."""

import torch
from torch import nn

STEPS = 4

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=5)
x = torch.randn(32, 3)
y = x[:, :1] * 2 - x[:, 1:2]
calls = 0


def closure():
    global calls
    calls += 1
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


for step in range(STEPS):
    loss = opt.step(closure)
    print(f"step {step} loss {loss.item():.5f}")
print(f"closure calls {calls}")
print(f"optimizer steps {STEPS}")
