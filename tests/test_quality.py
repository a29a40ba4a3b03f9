"""The package type-checks (mypy strict) and lints clean (ruff), as the style guide asks; its
version is written once; it cites only what the repository holds.

.ci/run runs ruff and mypy itself before the suite; both keep a cache in the checkout
(.ruff_cache, .mypy_cache), so the tests below then cost seconds, not a second full check."""

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
        pytest.skip(
            "mypy checks against the versions of constraints.txt; here: "
            + ", ".join(off[:6])
            + (" ..." if len(off) > 6 else "")
        )
    proc = subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_version_source():
    """The version is written once, in gradscope/__init__.py: pyproject.toml reads it
    (``dynamic``), and the installed metadata says the same."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")

    import gradscope

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "gradscope.__version__"
    # setuptools reads the attribute without importing gradscope (and torch): only a literal
    # assignment can be read that way
    assert re.search(
        r'^__version__ = "[^"]+"$', (ROOT / "gradscope" / "__init__.py").read_text(), flags=re.M
    )
    try:
        installed = metadata.version("gradscope")
    except metadata.PackageNotFoundError:
        pytest.skip("gradscope is not installed (pip install -e .)")
    assert installed == gradscope.__version__


_OUTSIDE = re.compile(r"notes/|notes,? remedies\.md|notes section|DESIGN\.md|\.\./shared|\bshared/")


def test_the_package_and_docs_point_only_inside_the_repository():
    """Comments and docs cite what the repository holds (docs/, benchmarks/...), never notes
    kept elsewhere; every ``docs/NAME.md`` the package names exists."""
    files = [
        *sorted((ROOT / "gradscope").rglob("*.py")),
        *sorted((ROOT / "examples").glob("*.py")),
        *sorted((ROOT / "benchmarks").glob("*.py")),
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
    ]
    outside, missing = [], []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            if _OUTSIDE.search(line):
                outside.append(f"{where}: {line.strip()}")
            if path.suffix == ".py":
                missing += [
                    f"{where}: {doc}"
                    for doc in re.findall(r"docs/[\w.-]+\.md", line)
                    if not (ROOT / doc).exists()
                ]
    assert not outside, "\n".join(outside)
    assert not missing, "\n".join(missing)
