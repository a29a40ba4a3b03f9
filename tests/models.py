"""Small seeded models and loops shared by the tests (no downloads; each runs in milliseconds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(width: int = 16, depth: int = 3, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, width), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.act = nn.ReLU()  # shared: applied after both convs (two sites)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act(self.conv1(x)), 2)
        x = F.max_pool2d(self.act(self.conv2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """Decoder-only, pre-LN, with dropout (watching must not touch the RNG)."""

    def __init__(self, vocab: int = 32, d: int = 16, heads: int = 2, blocks: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 12, d))  # owned by the root module
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                heads,
                4 * d,
                dropout=0.1,
                activation=nn.GELU(),
                batch_first=True,
                norm_first=True,
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied weights

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.emb(idx) + self.pos[:, :t]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


class MnistNet(nn.Module):
    """pytorch/examples' MNIST net, smaller: every activation is functional (``F.relu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout(x), 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def dead_linear(dead: int) -> nn.Sequential:
    """Linear(4, 8) + ReLU where the first ``8 - dead`` units are alive for every input in
    [0, 1) (unit i copies input i % 4, plus 1) and the last ``dead`` output exactly 0 for every
    input: a dead fraction of exactly ``dead / 8``."""
    lin = nn.Linear(4, 8)
    alive = 8 - dead
    with torch.no_grad():
        lin.weight.zero_()
        for i in range(alive):
            lin.weight[i, i % 4] = 1.0
        lin.bias[:alive] = 1.0
        lin.bias[alive:] = -1.0
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 2))


def half_dead_linear() -> nn.Sequential:
    """Units 0-3 alive, 4-7 dead: a dead fraction of exactly 0.5 (below the default
    ``dead_fraction``, 0.6: recorded, not a finding)."""
    return dead_linear(4)


def mostly_dead_linear() -> nn.Sequential:
    """Units 0-1 alive, 2-7 dead: a dead fraction of exactly 0.75, a ``dead_units`` finding at
    the default ``dead_fraction``."""
    return dead_linear(6)


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, make=batch, loss_fn=None):
    """A plain loop; returns the losses."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    losses = []
    for i in range(steps):
        x, y = make(seed=i)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def cpu_scaler(**kwargs: float):
    """A GradScaler on the CPU (torch >= 2.3), or the test is skipped with the reason."""
    import pytest

    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    try:
        return scaler_cls("cpu", **kwargs)
    except (RuntimeError, TypeError):
        pytest.skip("no CPU GradScaler in this torch")


def skip_without_cpu_fused() -> None:
    """Fused optimizers on the CPU need torch >= 2.4."""
    import pytest

    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        pytest.skip("fused optimizers on the CPU need torch >= 2.4")


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def compile_keeps_optimizer_hooks() -> bool:
    """torch 2.2's dynamo, at its first compile, strips the step hooks of every torch.optim
    class for the rest of the process (gone in 2.3, pytorch#115772): a compile test there
    would also break every test after it."""
    return _torch_at_least(2, 3)
