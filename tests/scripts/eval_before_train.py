"""A model evaluated under no_grad before (and between) training steps."""

import torch
from torch import nn

EPOCHS, STEPS_PER_EPOCH = 2, 3

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
x, y = torch.randn(32, 4), torch.randn(32, 1)
xv, yv = torch.randn(16, 4), torch.randn(16, 1)


def evaluate() -> float:
    model.eval()
    with torch.no_grad():
        for _ in range(3):  # several evaluation forwards: none of them is a step
            loss = nn.functional.mse_loss(model(xv), yv)
    model.train()
    return loss.item()


print(f"initial val {evaluate():.5f}")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
steps = 0
for epoch in range(EPOCHS):
    for _ in range(STEPS_PER_EPOCH):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        steps += 1
    print(f"epoch {epoch} train {loss.item():.5f} val {evaluate():.5f}")
with torch.inference_mode():
    print(f"final {nn.functional.mse_loss(model(xv), yv).item():.5f}")
print(f"optimizer steps {steps}")
