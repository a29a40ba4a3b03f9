"""Run as ``python -m pkg.train`` from tests/scripts."""

import os
import sys

import torch
from torch import nn


def main(steps: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.5f}")


if __name__ == "__main__":
    print("name:", __name__, "spec:", __spec__.name, "package:", __package__)
    print("argv0 is file:", sys.argv[0] == __file__, "args:", sys.argv[1:])
    print("path0 is cwd:", sys.path[0] == os.getcwd())
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
