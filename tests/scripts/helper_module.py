"""Imported by sibling_import.py from the script's own folder (sys.path[0])."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.body(x))


def make_model() -> nn.Module:
    return TinyNet()
