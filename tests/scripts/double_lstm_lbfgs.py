"""The shape of pytorch/examples' time_sequence_prediction, small: a float64 model (``.double()``)
of two LSTMCells unrolled over a sequence, trained by LBFGS with a closure that prints each
loss. That script died in its first backward under gradscope run (float64 statistics)."""

import math

import torch
from torch import nn


class Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 12)
        self.lstm2 = nn.LSTMCell(12, 12)
        self.linear = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = c1 = torch.zeros(x.size(0), 12, dtype=torch.double)
        h2 = c2 = torch.zeros(x.size(0), 12, dtype=torch.double)
        outputs = []
        for x_t in x.split(1, dim=1):
            h1, c1 = self.lstm1(x_t, (h1, c1))
            h2, c2 = self.lstm2(h1, (h2, c2))
            outputs.append(self.linear(h2))
        return torch.cat(outputs, dim=1)


torch.manual_seed(0)
t = torch.arange(40, dtype=torch.double)
data = torch.stack([torch.sin((t + 3 * k) / 4) for k in range(6)])
x, y = data[:, :-1], data[:, 1:]
seq = Sequence()
seq.double()
criterion = nn.MSELoss()
opt = torch.optim.LBFGS(seq.parameters(), lr=0.8, max_iter=4)
for i in range(2):
    print("STEP:", i)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = criterion(seq(x), y)
        print("loss:", loss.item())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        print("test loss:", criterion(seq(x[:2]), y[:2]).item(), math.isfinite(1.0))
