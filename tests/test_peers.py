"""benchmarks/peers.py end to end, as a smoke run (after a warm-up block, one 5-step block of
each variant on the MLP): it writes its RESULTS.md section and its JSON, with wandb installed or
not, and leaves no wandb file behind."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
WANDB = ["wandb_100", "wandb_every_step"]
OURS = [
    "plain",
    "norm_floor",
    "naive_loop",
    "default",
    "act_every_step",
    "always_trace",
    "detect_anomaly",
]
ARGS = ["--quick", "--workloads", "mlp", "--rounds", "1"]


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    out, raw, tmp = tmp_path / "RESULTS.md", tmp_path / "peers.json", tmp_path / "tmp"
    tmp.mkdir()
    out.write_text("# gradscope benchmarks\n\n## Another section\n\nkept\n")
    return out, raw, tmp


def _left_behind(tmp: Path) -> list[str]:
    """What the run left in its temporary directory (torch's compile cache aside)."""
    return [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor")]


def _check(data: dict[str, Any], md: str, with_wandb: bool) -> None:
    res = data["workloads"]["mlp"]
    assert data["meta"]["quick"] and res["rounds"] == 1
    expected = OURS + WANDB if with_wandb else OURS
    assert sorted(res["summary"]) == sorted(expected)
    assert res["summary"]["plain"]["ratio"] == 1.0
    assert all(len(res["block_seconds"][k]) == 1 for k in expected)
    assert res["nonfinite_findings"]["always_trace"] == 0
    assert "## Another section\n\nkept" in md  # the file's other sections stay
    section = md[md.index("## Side by side with the peers (CPU)") :]
    assert "quick smoke run" in section
    pivot = next(line for line in section.splitlines() if line.startswith("| mlp | "))
    assert len(pivot.split("|")) == 2 + 1 + 8  # workload + 8 variant columns
    if with_wandb:
        assert data["meta"]["wandb"] and res["not_installed"] == []
        assert f"wandb {data['meta']['wandb']} (offline" in section
        assert sorted(res["wandb_run_bytes"]) == WANDB
        assert "not installed" not in section
    else:
        assert data["meta"]["wandb"] is None and res["not_installed"] == WANDB
        assert pivot.count("not installed") == 2
        for kind in WANDB:
            assert f"| mlp | {kind} | not installed |" in section


@pytest.mark.slow
def test_peers_smoke_run_as_installed(tmp_path):
    """In a process of its own (wandb starts a service process and tears it down at exit)."""
    installed = importlib.util.find_spec("wandb") is not None
    out, raw, tmp = _files(tmp_path)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp),  # where its temporary directories go: checked empty below
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *ARGS, "--out", str(out), "--json", str(raw)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _left_behind(tmp) == [] and not (tmp_path / "wandb").exists()
    _check(json.loads(raw.read_text()), out.read_text(), with_wandb=installed)
    assert ("wandb is not installed" in proc.stdout) is not installed


def test_peers_without_wandb(tmp_path, monkeypatch, capsys):
    """Where wandb is not installed (here: its import fails), its variants are skipped with one
    line and reported as not installed. In this process: nothing of wandb runs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    peers = importlib.import_module("peers")
    monkeypatch.setitem(sys.modules, "wandb", None)
    for key in peers.wandb_env("unused"):  # put back as they were after the test
        monkeypatch.setenv(key, "")
    out, raw, tmp = _files(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    peers.main([*ARGS, "--out", str(out), "--json", str(raw)])
    assert _left_behind(tmp) == []
    _check(json.loads(raw.read_text()), out.read_text(), with_wandb=False)
    said = capsys.readouterr().out
    assert "wandb is not installed: skipping wandb_100, wandb_every_step" in said
