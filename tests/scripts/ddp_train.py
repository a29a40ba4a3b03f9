"""A plain torchrun DDP script (gloo, CPU) that knows nothing of gradscope: it prints its rank's
final loss; rank 1 alone sees inputs that kill ReLU unit 0 (dead on rank 1, alive on rank 0)."""

import sys

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight[0] = torch.tensor([10.0, 0.0, 0.0, 0.0])
        net[0].bias[0] = 0.0
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(16, 4, generator=g)
        x[:, 0] = x[:, 0].abs() * (1.0 if rank == 0 else -1.0)
        loss = nn.functional.mse_loss(model(x), torch.zeros(16, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"rank {rank} loss {loss.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
