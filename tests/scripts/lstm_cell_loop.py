"""An LSTMCell called once per time step in a Python loop (50 steps)."""

import torch
from torch import nn

T, STEPS = 50, 3


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 12)
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], 12)
        c = x.new_zeros(x.shape[1], 12)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return self.head(h)


torch.manual_seed(0)
torch.set_num_threads(1)
model = Seq()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x = torch.randn(T, 8, 3)
y = x[:, :, 0].mean(dim=0, keepdim=True).t()
for step in range(STEPS):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f}")
