"""The package type-checks (mypy strict) and lints clean (ruff), as the style guide asks."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _unpinned() -> list[str]:
    """The installed distributions whose version is not the one constraints.txt pins (a local
    label such as torch's ``+cpu`` aside)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    off = []
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"] or "")
        pinned = pins.get(name)
        if pinned is not None and dist.version.split("+")[0] != pinned:
            off.append(f"{name} {dist.version} (pinned {pinned})")
    return sorted(set(off))


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("ruff", ["check", "gradscope", "tests", "benchmarks", "examples"]),
        ("mypy", []),  # strict, on the package: configured in pyproject.toml
    ],
)
def test_tool_passes(tool, args):
    # run as `python -m TOOL`: installed beside this python, whether or not on PATH
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    if tool == "mypy" and (off := _unpinned()):
        # what mypy says depends on its version and on the annotations of every library it
        # reads (torch's above all); "clean" is a claim about the pinned set. ruff reads only
        # the code: it runs at any version from the floor in pyproject.toml on.
        pytest.skip("mypy checks against the versions of constraints.txt; here: "
                    + ", ".join(off[:6]) + (" ..." if len(off) > 6 else ""))
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
