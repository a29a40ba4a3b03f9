"""gradscope's own imports never resolve to the script's folder: a folder holding ``html.py``,
``xml.py``, ``packaging.py`` or ``zoneinfo.py`` (which the script never imports) must not stop
the record or the report, and the script's own modules stay its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHADOWS = ("html", "xml", "packaging", "zoneinfo")

TRAIN = """
import torch
from torch import nn
{watch}
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
{open}
for i in range(30):
    opt.zero_grad()
    nn.functional.cross_entropy(m(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
{close}
import html  # after gradscope imported the real one: the script still gets its own
print("done", html.MINE)
"""


def _folder(tmp_path: Path, watch: bool) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    for name in SHADOWS:
        body = (
            "MINE = 'the script folder'\n"
            if name == "html"
            else f"raise ImportError('the script folder\\'s {name}.py was imported')\n"
        )
        (folder / f"{name}.py").write_text(body)
    (folder / "train.py").write_text(
        TRAIN.format(
            watch="import gradscope" if watch else "",
            open=f"scope = gradscope.watch(m, out={str(tmp_path / 'runs')!r}, name='w')"
            if watch
            else "",
            close="scope.close()" if watch else "",
        )
    )
    return folder


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("how", ["gradscope run", "watch"])
def test_a_script_folder_shadowing_modules_gets_its_report(how, tmp_path):
    folder = _folder(tmp_path, watch=how == "watch")
    if how == "watch":
        args = [sys.executable, "train.py"]
    else:
        args = [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "w",
            "train.py",
        ]
    got = subprocess.run(args, capture_output=True, text=True, cwd=folder, env=_env(), timeout=180)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().splitlines()[-1] == "done the script folder"
    run = tmp_path / "runs" / "w"
    assert (run / "report.html").is_file(), got.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert list((run / "metrics").glob("part-*.parquet"))
    assert "internal error" not in got.stderr and "not written" not in got.stderr


def test_own_imports_puts_everything_back(tmp_path, monkeypatch):
    from gradscope.imports import own_imports

    folder = tmp_path / "script"
    folder.mkdir()
    (folder / "zoneinfo.py").write_text("MINE = True\n")
    (folder / "train.py").write_text("")
    main = type(sys)("__main__")
    main.__file__ = str(folder / "train.py")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.syspath_prepend(str(folder))
    saved = sys.modules.pop("zoneinfo", None)
    try:
        import zoneinfo as script_own  # the script's, first on sys.path

        assert getattr(script_own, "MINE", False)
        path_before = list(sys.path)
        with own_imports():
            import zoneinfo as real

            assert not hasattr(real, "MINE") and hasattr(real, "ZoneInfo")
            assert str(folder) not in sys.path
        assert sys.path == path_before
        assert sys.modules["zoneinfo"] is script_own
    finally:
        sys.modules.pop("zoneinfo", None)
        if saved is not None:
            sys.modules["zoneinfo"] = saved
