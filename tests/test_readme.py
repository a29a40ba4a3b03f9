"""The README's examples run unchanged and print what the README shows; its tables and links
keep up with the code."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import main as cli_main
from gradscope.rules.engine import KINDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks_after(marker: str) -> list[str]:
    tail = README[README.index(marker):]
    return re.findall(r"```[a-z]*\n(.*?)```", tail, flags=re.S)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", text)]


def _section(heading: str) -> str:
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:] if end < 0 else README[start:end]


_NUMBER = re.compile(r"-?\d+\.?\d*(?:e-?\d+)?")
_RUN_DIR = re.compile(r"\S*/reports/\d{8}-\d{6}-\w+")  # printed absolute: differs per machine
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _words(text: str) -> list[str]:
    return _RUN_DIR.sub("RUN_DIR", _ANSI.sub("", text)).split()


def _shape(words: list[str]) -> list[str]:
    return [_NUMBER.sub("#", w) for w in words]


def _same_words(got: list[str], want: list[str], rel: float = 1.5e-2) -> None:
    """The same words, wrapped anyhow; numbers equal to their printed digits (CPU kernels may
    differ in the last bits between machines)."""
    assert _shape(got) == _shape(want), f"\n got: {' '.join(got)}\nwant: {' '.join(want)}"
    assert _numbers(" ".join(got)) == pytest.approx(_numbers(" ".join(want)), rel=rel, abs=1e-9)


def _command_block(marker: str) -> tuple[list[str], list[str]]:
    """The gradscope arguments of a block's ``$ gradscope ...`` line, and the lines shown after."""
    first, *shown = _blocks_after(marker)[0].splitlines()
    assert first.startswith("$ gradscope "), first
    return shlex.split(first)[2:], shown


def _gradscope(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``gradscope ARGS`` in ``cwd`` as on a 100-column terminal, with ``examples/`` there."""
    if not (cwd / "examples").exists():
        (cwd / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradscope", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


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
    # the terminal summary of that run, shown after it (medians printed to 2 digits)
    args, shown = _command_block("<!-- summary")
    assert args == ["summary", "reports/quickstart"]
    _same_words(_words(_gradscope(args, tmp_path).stdout), _words("\n".join(shown)), rel=5e-2)


@pytest.mark.slow
def test_gradscope_run_transcript_is_what_it_prints(tmp_path):
    """The `gradscope run` transcript: the script's stdout lines in order, and every other line
    shown is gradscope's stderr, in order."""
    args, shown = _command_block("<!-- transcript")
    proc = _gradscope(args, tmp_path)
    script_lines = [line for line in proc.stdout.splitlines() if line.strip()]
    rest, i = [], 0
    for line in shown:
        if i < len(script_lines) and _shape(_words(line)) == _shape(_words(script_lines[i])):
            _same_words(_words(script_lines[i]), _words(line))
            i += 1
        else:
            rest.append(line)
    assert i == len(script_lines), f"script output not shown: {script_lines[i:]}"
    _same_words(_words(proc.stderr), _words("\n".join(rest)))


@pytest.mark.slow
def test_finding_excerpt_is_what_it_prints(tmp_path):
    args, shown = _command_block("<!-- excerpt")
    want = _words("\n".join(line for line in shown if line != "..."))
    got = _words(_gradscope(args, tmp_path).stderr)
    starts = [i for i in range(len(got) - len(want) + 1)
              if _shape(got[i:i + len(want)]) == _shape(want)]
    assert starts, f"not in stderr: {' '.join(want)}\n{' '.join(got)}"
    _same_words(got[starts[0]:starts[0] + len(want)], want)


def test_findings_table_lists_every_kind_and_real_options():
    rows = [line for line in _section("What it finds").splitlines()
            if line.startswith("| ") and not line.startswith("| pathology")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert sorted(re.fullmatch(r"`(\w+)`", c[1]).group(1) for c in cells) == sorted(KINDS)
    fields = {f.name for f in dataclasses.fields(gradscope.Config)}
    remedies = " ".join(c[3] for c in cells)
    assert set(re.findall(r"`(\w+)=", remedies)) <= fields
    assert {"clip", "guard", "swap", "recycle"} <= set(re.findall(r"`(\w+)=", remedies))
    examples = re.findall(r"`(\w+\.py)`", " ".join(c[0] for c in cells))
    assert examples and all((ROOT / "examples" / name).exists() for name in examples)


def test_gradscope_run_flags_named_in_the_readme_exist():
    run = cli_main.commands["run"]
    flags = {o for p in run.params for o in (*p.opts, *p.secondary_opts)}
    text = _section("What it finds") + _section("FAQ")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert named and named <= flags, named - flags


def test_relative_links_and_anchors_resolve():
    def anchor(heading: str) -> str:  # GitHub's heading ids
        return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")

    anchors = {anchor(h) for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://")):
            continue
        path, _, frag = target.partition("#")
        if path:
            assert (ROOT / path).exists(), target
        elif frag:
            assert frag in anchors, target


def test_every_config_option_is_documented():
    section = README[README.index("## Configuration"):README.index("## Status")]
    for field in dataclasses.fields(gradscope.Config):
        assert f"`{field.name}`" in section, f"README's configuration table misses {field.name}"
