"""Worker of tests/test_distributed.py, started once by torchrun (2 ranks, gloo, CPU).

Each scenario trains the same small network on several ranks (DDP, FSDP1 with and without
use_orig_params, FSDP2) under gradscope.watch, and computes the single-process reference on
every rank: the same network trained on the union of the ranks' batches with a mean loss,
measured with torch's own functions. Rank 0 writes what gradscope recorded and what the
reference says into OUT/<scenario>.json; test_distributed.py compares them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradscope

STEPS = 6
BATCH = 8  # per rank


class Blow(nn.Module):
    """Multiplies by 1e39 on the chosen rank at the chosen step: an fp32 overflow to inf."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e39 if self.armed else x


def network() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[0] = -100.0  # unit 0: dead for every input
        net[0].weight[1].zero_()
        net[0].weight[1, 0] = 5.0  # unit 1: alive only where feature 0 > 0.1 (rank 1's data)
        net[0].bias[1] = -0.5
    return net


def data(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union batch of one step; rank r gets rows [r*BATCH, (r+1)*BATCH)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * BATCH, 6, generator=g)
    x[:BATCH, 0] = -x[:BATCH, 0].abs() - 0.2  # rank 0: feature 0 negative
    x[BATCH:, 0] = x[BATCH:, 0].abs() + 0.2
    y = torch.randn(world * BATCH, 1, generator=g)
    return x, y


def fit(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    rank: int,
    world: int,
    nan_at: int | None = None,
) -> None:
    """``steps`` steps on this rank's share of each union batch (a NaN in rank 1's batch of
    step ``nan_at``)."""
    for step in range(steps):
        x, y = data(step, world)
        x, y = x[rank * BATCH : (rank + 1) * BATCH].clone(), y[rank * BATCH : (rank + 1) * BATCH]
        if step == nan_at and rank == 1:
            x[0, 0] = float("nan")
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def reference(world: int) -> dict[str, float]:
    """The single-process run on the union batches, measured with torch's functions."""
    net = network()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    out: dict[str, float] = {}
    acts: dict[str, torch.Tensor] = {}
    net[1].register_forward_hook(lambda m, a, o: acts.__setitem__("1", o.detach()))
    net[3].register_forward_hook(lambda m, a, o: acts.__setitem__("3", o.detach()))
    for step in range(STEPS):
        x, y = data(step, world)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        out[f"loss|(run)|{step}"] = loss.item()
        total = 0.0
        for name, p in net.named_parameters():
            assert p.grad is not None
            n = torch.linalg.vector_norm(p.grad).item()
            out[f"grad_norm|{name}|{step}"] = n
            out[f"grad_max_abs|{name}|{step}"] = p.grad.abs().max().item()
            out[f"weight_norm|{name}|{step}"] = torch.linalg.vector_norm(p).item()
            total += n * n
        out[f"grad_norm_total|(run)|{step}"] = total**0.5
        relu, tanh = acts["1"], acts["3"]
        out[f"act_dead_fraction|1|{step}"] = (relu <= 0).all(0).float().mean().item()
        out[f"act_mean|1|{step}"] = relu.mean().item()
        out[f"act_std|1|{step}"] = relu.std().item()
        out[f"act_mean|3|{step}"] = tanh.mean().item()
        out[f"act_saturation|3|{step}"] = (tanh.abs() > 0.99).float().mean().item()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        for name, p in net.named_parameters():
            delta = torch.linalg.vector_norm(before[name] - p.detach()).item()
            norm = torch.linalg.vector_norm(before[name]).item()
            out[f"update_ratio|{name}|{step}"] = delta / norm
    return out


def wrap(kind: str, net: nn.Module) -> nn.Module:
    cpu = torch.device("cpu")
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(net)
    if kind in ("fsdp1_orig", "fsdp1_flat"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        orig = kind == "fsdp1_orig"
        net[0] = FSDP(net[0], device_id=cpu, use_orig_params=orig)  # a nested unit
        return FSDP(net, device_id=cpu, use_orig_params=orig)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)  # Linear(8, 1)'s bias: one element, rank 1's part is empty
        return net
    raise ValueError(kind)


def recorded(run: gradscope.load.Run, steps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in (
        "grad_norm",
        "grad_max_abs",
        "weight_norm",
        "update_ratio",
        "grad_norm_total",
        "loss",
        "act_dead_fraction",
        "act_mean",
        "act_std",
        "act_saturation",
    ):
        wide = run.wide(metric)
        for step in wide.index:
            for layer in wide.columns:
                value = wide.loc[step, layer]
                if value == value:  # not NaN (not recorded)
                    out[f"{metric}|{layer}|{int(step)}"] = float(value)
    return out


def train(kind: str, out: Path, rank: int, world: int) -> dict[str, object]:
    net = wrap(kind, network())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scope = gradscope.watch(
        net,
        out=str(out / kind),
        name="run",
        activation_every=1,
        flush_every=4,
        update_every=1,
        quiet=True,
        report=rank == 0,
    )
    fit(net, opt, STEPS, rank, world)
    scope.close()
    result: dict[str, object] = {"run_dir": str(scope.run_dir)}
    if rank == 0:
        run = gradscope.load_run(scope.run_dir)
        result["got"] = recorded(run, STEPS)
        result["meta"] = json.loads((scope.run_dir / "run.json").read_text())
        result["findings"] = json.loads((scope.run_dir / "findings.json").read_text())
        result["files"] = sorted(p.name for p in scope.run_dir.iterdir())
    return result


def nonfinite(out: Path, rank: int, world: int) -> dict[str, object]:
    """Rank 1 alone overflows at step 3 (DDP then spreads the NaN into every rank's
    gradients); the finding names the module and rank 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), Blow(), nn.ReLU(), nn.Linear(8, 1))
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    with gradscope.watch(
        ddp, out=str(out / "nonfinite"), name="run", quiet=True, report=False, flush_every=2
    ) as scope:
        for step in range(6):
            net[1].armed = rank == 1 and step == 3
            x, y = data(step, world)
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x[:BATCH]), y[:BATCH]).backward()
            opt.step()
    result: dict[str, object] = {}
    if rank == 0:
        result["findings"] = json.loads((scope.run_dir / "findings.json").read_text())
        events = (scope.run_dir / "events.jsonl").read_text().splitlines()
        result["traced"] = [json.loads(e) for e in events if '"nonfinite_traced"' in e]
    return result


def fsdp2_remedies(out: Path, rank: int, world: int) -> dict[str, object]:
    """FSDP2 with clip="norm:0.05" and the guard; rank 1's batch of step 3 holds a NaN. Every
    rank must skip step 3 and clip the others by the global norm: the weights equal the
    single-process run that clips with clip_grad_norm_ and leaves out step 3."""
    nan_step = 3
    net = wrap("fsdp2", network())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradscope.watch(
        net,
        out=str(out / "fsdp2_remedies"),
        name="run",
        clip="norm:0.05",
        guard=True,
        quiet=True,
        report=False,
    ) as scope:
        fit(net, opt, STEPS, rank, world, nan_at=nan_step)
    full = {n: p.full_tensor().detach() for n, p in net.named_parameters()}  # type: ignore
    ref = network()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(STEPS):
        if step == nan_step:
            continue
        x, y = data(step, world)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
    refusals = []
    for kind, clip in (("fsdp1_flat", "norm:1.0"), ("fsdp1_orig", "zclip"), ("fsdp2", "agc")):
        try:
            gradscope.watch(wrap(kind, network()), out=str(out / "refused"), clip=clip)
        except ValueError as exc:
            refusals.append(str(exc))
    result: dict[str, object] = {"refusals": refusals}
    if rank == 0:
        result["max_diff"] = max(
            (full[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()
        )
        run = gradscope.load_run(scope.run_dir)
        result["skipped"] = run.wide("guard_skipped").index.tolist()
        result["clipped_total"] = run.wide("grad_norm_total_clipped")["(run)"].tolist()
    return result


def internal_error(out: Path, rank: int, world: int) -> dict[str, object]:
    """gradscope fails inside a hook on rank 1 at step 3: that rank keeps taking part in the
    flush exchanges (no rank waits for it), and rank 0 writes the error with its rank."""
    from gradscope.probes.grads import GradProbe

    net = nn.parallel.DistributedDataParallel(network())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    original = GradProbe.record
    calls = [0]

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if rank == 1 and calls[0] >= 4:
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    GradProbe.record = failing  # type: ignore[method-assign]
    try:
        with gradscope.watch(
            net,
            out=str(out / "internal_error"),
            name="run",
            flush_every=2,
            activation_every=1,
            quiet=True,
            report=False,
        ) as scope:
            fit(net, opt, 8, rank, world)
    finally:
        GradProbe.record = original  # type: ignore[method-assign]
    result: dict[str, object] = {}
    if rank == 0:
        events = (scope.run_dir / "events.jsonl").read_text().splitlines()
        result["errors"] = [json.loads(e) for e in events if '"internal_error"' in e]
        result["meta"] = json.loads((scope.run_dir / "run.json").read_text())
        run = gradscope.load_run(scope.run_dir)
        result["grad_steps"] = run.wide("grad_norm").index.tolist()
    return result


def destroyed(out: Path, rank: int, world: int) -> dict[str, object]:
    """The script destroys the process group before the scope closes (the usual ending of a
    torchrun script): the records are combined in time. Run last: it ends the group."""
    net = nn.parallel.DistributedDataParallel(network())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scope = gradscope.watch(
        net,
        out=str(out / "destroyed"),
        name="run",
        activation_every=1,
        flush_every=100,
        quiet=True,
        report=False,
    )
    fit(net, opt, 3, rank, world)
    dist.destroy_process_group()
    scope.close()
    result: dict[str, object] = {}
    if rank == 0:
        run = gradscope.load_run(scope.run_dir)
        result["dead"] = run.wide("act_dead_fraction")["1"].tolist()
        result["meta"] = json.loads((scope.run_dir / "run.json").read_text())
    return result


def main() -> None:
    out = Path(sys.argv[1])
    which = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, object] = {"reference": reference(world), "world": world}
    for name in which:
        try:
            if name == "nonfinite":
                results[name] = nonfinite(out, rank, world)
            elif name == "fsdp2_remedies":
                results[name] = fsdp2_remedies(out, rank, world)
            elif name == "internal_error":
                results[name] = internal_error(out, rank, world)
            elif name == "destroyed":
                results[name] = destroyed(out, rank, world)
            else:
                results[name] = train(name, out, rank, world)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        if name != "destroyed":
            dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
