"""On a GPU the step path never synchronises with the host; only flushes do.

Skipped (with the reason) where no CUDA device is present, as on CI.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # torch announces that the debug mode itself is a prototype, on every switch
    pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype:UserWarning"),
]


def test_no_host_sync_between_flushes(out):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    scope = gradscope.watch(model, opt, out=out, flush_every=20, flush_secs=1e9, activation_every=3)
    flusher = scope.parts.flusher
    flush = flusher.flush
    flushes = []

    def flush_without_debug_mode(*args, **kwargs):  # the one place a host transfer is allowed
        torch.cuda.set_sync_debug_mode("default")
        try:
            flush(*args, **kwargs)
            flushes.append(scope.steps)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    flusher.flush = flush_without_debug_mode  # type: ignore[method-assign]
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any other sync raises
        for _ in range(45):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        scope.close()  # its last flush switches the mode back to "error"
        torch.cuda.set_sync_debug_mode("default")
    assert flushes == [19, 39, 45]  # when the 20th and 40th rows commit; the rest at close
    run = scope.load()
    # a sync raises inside a hook, where the guard turns it into an internal error: none
    assert not [e for e in run.events if e.get("event") == "internal_error"], run.events
    assert run.meta["steps"] == 45 and len(run.wide("grad_norm")) == 45
    assert list(run.wide("act_dead_fraction").index)[:3] == [0, 3, 6]


@pytest.mark.parametrize(
    "clip",
    [
        "norm:1.0",
        "norm:0.5,per_layer",
        "autoclip",
        "autoclip:history=8",
        "autoclip:per_layer",
        "agc:0.01",
        "zclip:warmup=5",
        "zclip:warmup=5,per_layer",
    ],
)
def test_clipping_never_synchronises(out, clip):
    """Every clipping method computes and applies its coefficient on the device: no host sync
    between flushes, and a fixed clip gives clip_grad_norm_'s weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    ref = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(128, 64, device="cuda") * 10
    y = torch.randint(0, 10, (128,), device="cuda")
    scope = gradscope.watch(
        model, opt, out=out, flush_every=1000, flush_secs=1e9, clip=clip, quiet=True
    )
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        scope.close()
    run = scope.load()
    assert not [e for e in run.events if e.get("event") == "internal_error"], run.events
    coef = run.wide("clip_coef")
    assert len(coef) == 12 and (coef.to_numpy() <= 1.0 + 1e-6).all()
    if clip == "norm:1.0":
        for _ in range(12):
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ref_opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.equal(a, b)


def test_guard_skips_a_nonfinite_step_on_the_gpu(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 8, device="cuda")
    with gradscope.watch(model, opt, out=out, guard=True, quiet=True) as scope:
        for step in range(6):
            opt.zero_grad()
            xb = x * float("nan") if step == 3 else x
            model(xb).pow(2).mean().backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            if step == 3:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scope.load().wide("guard_skipped").index.tolist() == [3]


def test_clipper_state_round_trips_through_a_cpu_checkpoint(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 16, device="cuda") * 5
    y = torch.randint(0, 4, (64,), device="cuda")
    with gradscope.watch(model, opt, out=out, quiet=True, clip="zclip:warmup=3") as scope:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        state = scope.state_dict()
    (zstate,) = state["remedies"]["clippers"][0]["state"][:1]
    assert zstate.device.type == "cpu" and int(zstate[0]) == 3  # warm-up done, saved on CPU
    with gradscope.watch(model, opt, out=out, quiet=True, clip="zclip:warmup=3") as scope:
        scope.load_state_dict(state)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    thr = scope.load().wide("clip_threshold")["(run)"]
    assert torch.isfinite(torch.tensor(thr.to_numpy())).all()  # no second warm-up
