"""Worker of tests/test_integrations.py: Lightning's own DDP strategy (2 CPU processes, gloo)
with GradscopeCallback; Lightning starts the second process by running this file again."""

import sys
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")  # the framework's notes (few workers, ...) are not ours

import lightning.pytorch as pl  # noqa: E402

from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402


class Lit(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1, keepdim=True)
    cb = GradscopeCallback(out=sys.argv[1], name="pl", report=False, activation_every=1)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Lit(), DataLoader(TensorDataset(x, y), batch_size=8))
    print(f"rank {trainer.global_rank} steps {trainer.global_step}", flush=True)
