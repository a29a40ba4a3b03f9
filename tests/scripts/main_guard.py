"""Work happens only under the __main__ guard."""

import torch
from torch import nn

STEPS = 4


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.5f}")


print("module name:", __name__)
if __name__ == "__main__":
    print("guard entered; __file__ absolute:", __file__.startswith("/"))
    main()
