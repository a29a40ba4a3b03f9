"""Imports a module that sits next to it."""

import os
import sys

import torch
from helper_module import make_model
from torch import nn

print("path0 is script dir:", sys.path[0] == os.path.dirname(os.path.realpath(__file__)))
torch.manual_seed(0)
torch.set_num_threads(1)
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randn(8, 1)
for step in range(4):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f}")
