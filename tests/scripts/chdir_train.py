"""Changes the working directory (as hydra and some launchers do) before training:
``chdir_train.py DIR``."""

import os
import sys

import torch
from torch import nn

os.chdir(sys.argv[1])
print("now in:", os.path.basename(os.getcwd()))
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Linear(3, 1)
x, y = torch.randn(8, 3), torch.randn(8, 1)
for step in range(3):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    print(f"step {step} loss {loss.item():.5f}")
