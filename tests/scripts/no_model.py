"""No trainable model: plain tensor arithmetic and a frozen module used for inference."""

import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)
frozen = nn.Linear(3, 2).requires_grad_(False)
x = torch.randn(4, 3)
print("frozen out:", " ".join(f"{v:.5f}" for v in frozen(x).flatten().tolist()))
w = torch.randn(3, requires_grad=True)
loss = (x @ w).pow(2).mean()
loss.backward()
print(f"loss {loss.item():.5f} grad norm {w.grad.norm().item():.5f}")
