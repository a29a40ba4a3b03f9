"""An uncaught ValueError raised two calls deep after a few steps."""

import torch
from torch import nn

BAD_STEP = 3


def check(loss: float, step: int) -> None:
    if step == BAD_STEP:
        raise ValueError(f"loss check failed at step {step}: {loss:.4f}")


def train_step(model, opt, x, y, step):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f}", flush=True)
    check(loss.item(), step)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    for step in range(10):
        train_step(model, opt, x, y, step)


main()
