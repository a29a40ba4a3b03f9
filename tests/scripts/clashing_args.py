"""Argparse flags that look like gradscope's own options: they must all reach the script."""

import argparse
import sys

import torch
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--out", default="default-out")
p.add_argument("--name", default="default-name")
p.add_argument("--config", default=None)
p.add_argument("--clip", type=float, default=None)
p.add_argument("-m", dest="mode", default="none")
p.add_argument("--quiet", action="store_true")
p.add_argument("--steps", type=int, default=3)
p.add_argument("rest", nargs="*")
args = p.parse_args()
print("argv:", sys.argv[1:])
print("parsed:", sorted(vars(args).items()))

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(16, 4), torch.randn(16, 1)
for step in range(args.steps):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if args.clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    if not args.quiet:
        print(f"step {step} loss {loss.item():.5f}")
