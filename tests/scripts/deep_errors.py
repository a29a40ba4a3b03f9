"""An uncaught exception raised below a watched model's call: ``forward`` (inside the module's
``forward``, on its third call) or ``backward`` (``loss.backward()`` through a freed graph).
No optimizer object (hand-written updates), so it starts fast."""

import sys

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if where == "forward" and self.calls == 3:
            raise ValueError("bad batch in forward")
        return self.fc(x)


where = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(1)
model = Net()
x = torch.randn(4, 3)
for step in range(4):
    loss = model(x).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    print(f"step {step} loss {loss.item():.5f}", flush=True)
    if where == "backward" and step == 2:
        loss.backward()  # a second time through the freed graph: RuntimeError
