"""torch.save of a whole model (a class defined in __main__), then torch.load of it.

``save_model.py --save PATH`` trains, saves, loads it back and prints the outputs of both;
``save_model.py --load PATH`` only loads the file (e.g. in a plain python process) and prints
the loaded model's outputs.
"""

import argparse

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def probe(model: nn.Module) -> str:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        out = model(torch.randn(4, 3, generator=g))
    return " ".join(f"{v:.5f}" for v in out.flatten().tolist())


def main() -> None:
    p = argparse.ArgumentParser()
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save")
    mode.add_argument("--load")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.load:
        loaded = torch.load(args.load, weights_only=False)
        print("loaded type:", type(loaded).__module__, type(loaded).__name__)
        print("loaded outputs:", probe(loaded))
        return
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    for step in range(3):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.5f}")
    print("model outputs:", probe(model))
    torch.save(model, args.save)
    loaded = torch.load(args.save, weights_only=False)
    print("loaded type:", type(loaded).__module__, type(loaded).__name__)
    print("loaded outputs:", probe(loaded))
    print(
        "hooks on loaded:",
        sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in loaded.modules()
        ),
    )


if __name__ == "__main__":
    main()
