"""Shared fixtures. Every test is checked for leaked hooks and patches (autouse)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn.modules.module as module_globals
import torch.optim.optimizer as optim_globals

from gradscope import patches

_GLOBAL_DICTS = {
    name: getattr(owner, attr, {})
    for name, owner, attr in [
        ("module forward", module_globals, "_global_forward_hooks"),
        ("module forward-pre", module_globals, "_global_forward_pre_hooks"),
        ("module backward", module_globals, "_global_backward_hooks"),
        ("module backward-pre", module_globals, "_global_backward_pre_hooks"),
        ("optimizer pre", optim_globals, "_global_optimizer_pre_hooks"),
        ("optimizer post", optim_globals, "_global_optimizer_post_hooks"),
    ]
}


def _global_counts() -> dict[str, int]:
    return {name: len(d) for name, d in _GLOBAL_DICTS.items()}


@pytest.fixture(autouse=True)
def no_leaked_hooks():
    """Fail any test that leaves a global hook or gradscope's process-wide patches behind."""
    before = _global_counts()
    backward = torch.autograd.backward
    yield
    gc.collect()
    assert _global_counts() == before, "a global hook outlived its test"
    assert not patches.installed(), "gradscope's backward patch outlived its test"
    assert torch.autograd.backward is backward


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The output root for runs."""
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Every hook on every module of ``model``, by module name and kind."""
    counts = {}
    for name, m in model.named_modules():
        counts[name] = (
            len(m._forward_hooks), len(m._forward_pre_hooks),
            len(m._backward_hooks), len(m._backward_pre_hooks),
        )
    return counts
