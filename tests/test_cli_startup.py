"""The command line answers ``--help``, ``--version`` and usage errors without importing torch
(which alone takes over a second): each case runs in a fresh interpreter, which then lists the
heavy modules it imported. Timing-free: what is measured is what was imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "pyarrow", "matplotlib", "tensorboard", "jinja2", "rich")

_PROBE = (
    "import json, sys\n"
    "from gradscope.cli import entry\n"
    "code = entry(json.loads(sys.argv[1]))\n"
    "heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]\n"
    "print('\\n' + json.dumps({'code': code, 'heavy': heavy}))\n"
)


def _probe(args: list[str], cwd) -> tuple[dict, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(HEAVY)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *out, last = proc.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(out), proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["run", "--help"],
        ["demo", "--help"],
        ["view", "--help"],
        ["--version"],
    ],
)
def test_help_and_version_do_not_import_torch(tmp_path, args):
    result, out, _ = _probe(args, tmp_path)
    assert result == {"code": 0, "heavy": []}
    assert out.startswith("Usage: gradscope") or out.startswith("gradscope, version")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--threshold", "nope", "x.py"], "--threshold 'nope': expected NAME=NUMBER"),
        (["run", "--threshold", "dead_fraction=2", "train.py"], "expected a number in (0, 1]"),
        (["run", "--name", "n" * 300, "train.py"], "300 bytes"),
        (["run", "--name", "a/b", "train.py"], "--name 'a/b': expected a plain directory name"),
        (["run", "missing.py"], "missing.py: no such file"),
        (["run", "--clip", "zclp", "train.py"], "unknown clipping method 'zclp'"),
        (["run", "--swap", "relu->nothing", "train.py"], "unknown activation 'nothing'"),
        (["run", "--guard=many", "train.py"], "--guard 'many'"),
        (["run", "--no-such-option", "train.py"], "--no-such-option"),  # click's wording
        (["run", "--flush-every", "x", "train.py"], "'x' is not a valid integer"),
        (["run", "--out", "train.py/x", "train.py"], "cannot create the output root"),
        (["run"], "Missing argument"),
        (["demo", "--guard-limit", "0"], "0 is not in the range x>=1"),
        (["demo", "--clip", "norm"], "norm needs max="),
        (["demo", "--out", "train.py/x"], "cannot create the output root"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
    ],
)
def test_usage_errors_do_not_import_torch(tmp_path, args, message):
    (tmp_path / "train.py").write_text("print('never')\n")
    result, out, err = _probe(args, tmp_path)
    assert result == {"code": 2, "heavy": []}, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert out == ""


def test_a_project_config_is_checked_without_torch(tmp_path):
    (tmp_path / "train.py").write_text("print('never')\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.gradscope]\nclip = "zclip"\nswap = "relu->gelu"\nguard = 3\n'
        "thresholds = { dead_fraction = 1.5 }\n"
    )
    result, _, err = _probe(["run", "train.py"], tmp_path)
    assert result == {"code": 2, "heavy": []}
    assert "pyproject.toml: thresholds: dead_fraction=1.5: expected a number in (0, 1]" in err
