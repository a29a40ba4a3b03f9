"""The package type-checks (mypy strict) and lints clean (ruff), as the style guide asks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("ruff", ["check", "gradscope", "tests", "benchmarks", "examples"]),
        ("mypy", []),  # strict, on the package: configured in pyproject.toml
    ],
)
def test_tool_passes(tool, args):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
