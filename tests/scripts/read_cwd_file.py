"""Reads data.txt relative to the working directory (not the script's folder)."""

import os

import torch
from torch import nn

with open("data.txt", encoding="utf-8") as fh:
    values = [float(v) for v in fh.read().split()]
print("read", len(values), "values from", os.path.basename(os.getcwd()) != "scripts")
torch.manual_seed(0)
torch.set_num_threads(1)
data = torch.tensor(values).reshape(-1, 2)
x, y = data[:, :1], data[:, 1:]
model = nn.Linear(1, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(5):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f}")
