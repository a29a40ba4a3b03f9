"""A DataLoader with two forked workers over a TensorDataset."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 2


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(64, 4)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=16,
        shuffle=False,
        num_workers=2,
        multiprocessing_context="fork",
    )
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    for epoch in range(EPOCHS):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        print(f"epoch {epoch} loss {total / len(loader):.5f}")
    print(f"optimizer steps {steps}")


if __name__ == "__main__":
    main()
