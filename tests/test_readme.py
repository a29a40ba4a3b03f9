"""The README's first example runs unchanged and prints what the README shows."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks_after(marker: str) -> list[str]:
    tail = README[README.index(marker):]
    return re.findall(r"```[a-z]*\n(.*?)```", tail, flags=re.S)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", text)]


def test_setup_commands_open_the_readme():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)[:2]
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && gradscope demo")
    assert commands[1] == ('pip install torch==2.13.0 && pip install -e ".[test]" && '
                           "python -m pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_quickstart_is_the_example_file_and_prints_what_the_readme_shows(tmp_path):
    code, shown = _blocks_after("<!-- quickstart")[:2]
    assert code == (ROOT / "examples" / "quickstart.py").read_text().split('"""\n\n', 1)[1]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, want = proc.stdout.split(), shown.split()
    # the same words; numbers equal to their printed 3 significant digits (CPU kernels may
    # differ in the last bits between machines)
    number = re.compile(r"-?\d+\.?\d*(?:e-?\d+)?")
    assert [number.sub("#", t) for t in got] == [number.sub("#", t) for t in want]
    assert _numbers(" ".join(got)) == pytest.approx(_numbers(" ".join(want)), rel=1.5e-2, abs=1e-9)
    assert (tmp_path / "reports" / "quickstart" / "run.json").exists()


def test_every_config_option_is_documented():
    section = README[README.index("## Configuration"):README.index("## Status")]
    for field in dataclasses.fields(gradscope.Config):
        assert f"`{field.name}`" in section, f"README's configuration table misses {field.name}"
