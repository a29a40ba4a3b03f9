"""Shared fixtures. Every test is checked for leaked hooks and patches (autouse)."""

from __future__ import annotations

import gc
import os
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


@pytest.fixture(scope="module", autouse=True)
def _frozen_before_the_module():
    """Keep what already lives out of the per-test collections below (``gc.freeze``).

    A full collection walks every object that torch, pandas, matplotlib and the test modules
    made: ~0.25 s on a 2-core machine, which ``no_leaked_hooks`` paid after every test (~4 of
    the suite's ~12 minutes). Here, at each test module's start, one full collection (frozen
    objects included: what died since is freed) and then whatever still lives moves to the
    permanent generation; ``no_leaked_hooks`` freezes again after each test's collection. So
    ``gc.collect()`` after a test walks what was made since the previous test's end: all the
    garbage the test made, a hook or a scope left in it included, is collected and checked as
    before. (``gc.get_objects()`` lists only those objects too: tests/test_lifecycle.py
    compares two counts taken within one test.)"""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def no_leaked_hooks():
    """Fail any test that leaves a global hook or gradscope's process-wide patches behind."""
    before = _global_counts()
    backward = torch.autograd.backward
    yield
    gc.collect()
    gc.freeze()  # what the test left alive: not walked again after the next test
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
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
    return counts


# -- the whole suite ran -------------------------------------------------------------------------
# ``python -m pytest`` with no paths (the README's test command, CI) collects at least this many
# tests (659 when this was written). Fewer means tests went missing without an error (a module
# that no longer defines them, a renamed file, a wrong testpaths): fail instead of passing green.
MIN_TESTS = 600
_deselected = 0


def pytest_deselected(items):
    global _deselected
    _deselected += len(items)  # -k, -m, --deselect: chosen, not missing


def pytest_collection_finish(session):
    config = session.config
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or config.getoption("lf", False):
        return  # paths named on the command line, or only the last failures: a part on purpose
    collected = len(session.items) + _deselected
    if collected < MIN_TESTS:
        pytest.exit(
            f"the suite collected {collected} tests, fewer than its {MIN_TESTS} "
            "(tests/conftest.py MIN_TESTS): tests went missing",
            returncode=1,
        )


# -- one torch thread per process ----------------------------------------------------------------
# The tests' tensors are small: a second thread buys nothing, and on a loaded machine (CI's two
# cores shared with another job) OpenMP's threads wait on each other: measured, test_grads.py and
# the 2,000-step memory test with two busy processes beside them: 34 s with 2 threads, 11 s with
# 1. The subprocesses the tests start inherit the variable (OMP_NUM_THREADS=2 in the environment
# keeps 2 everywhere).
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
