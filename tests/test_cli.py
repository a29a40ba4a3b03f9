"""The command line, through click's CliRunner (and once for real, as a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

import gradscope
from gradscope.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and gradscope.__version__ in result.output


def test_demo_writes_a_run_and_summarises_it(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--steps", "30"],
                                terminal_width=120)
    assert result.exit_code == 0, result.output
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and (runs[0] / "run.json").exists()
    assert "status=completed" in result.output and "steps=30" in result.output
    assert "Linear" in result.output and "Sigmoid" in result.output
    run = gradscope.load_run(runs[0])
    signal = run.wide("output_grad_norm").loc[0]
    assert signal["0"] < signal["10"]  # the demo's point: the backward signal vanishes with depth
    assert [(f["kind"], f["layer"]) for f in run.findings][:1] == [("vanishing_gradients", "0")]
    assert "1 finding(s)" in result.output or "finding(s)" in result.output
    assert "vanishing_gradients" in result.output  # printed once, in the summary
    assert result.output.count("vanishing_gradients") == 1


def test_summary_of_a_missing_run_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["summary", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(main, ["summary", str(tmp_path)])
    assert result.exit_code == 2 and "not a gradscope run directory" in result.output
    assert "Traceback" not in result.output


def test_demo_bad_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "gradscope", "demo", "--out", str(blocker / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "cannot create the output root" in proc.stderr


def test_demo_takes_the_remedy_options(tmp_path):
    result = CliRunner().invoke(
        main, ["demo", "--out", str(tmp_path), "--steps", "20", "--clip", "norm:0.01,per_layer",
               "--guard", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    run = gradscope.load_run(run_dir)
    assert run.meta["config"]["clip"] == "norm:max=0.01,per_layer=true"
    assert run.meta["config"]["guard"] == 3
    assert (run.wide("grad_norm_clipped").to_numpy() <= 0.01 + 1e-6).all()


@pytest.mark.parametrize("args, message", [
    (["--clip", "zclp"], "unknown clipping method 'zclp' (did you mean 'zclip'?)"),
    (["--guard", "many"], "guard='many': expected True, False"),
    (["--swap", "relu->nothing"], "unknown activation 'nothing'"),
])
def test_bad_remedy_option_is_a_one_line_usage_error(tmp_path, args, message):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def _run_parse(args, monkeypatch, tmp_path):
    """What `gradscope run ARGS` would run, with which Config (without running it)."""
    import gradscope.runner as runner

    seen = {}

    def fake_run(target, script_args, config):
        seen.update(target=target, args=script_args, config=config)

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    result = CliRunner().invoke(main, ["run", *args])
    return result, seen


def test_run_options_end_at_the_script(monkeypatch, tmp_path):
    result, seen = _run_parse(["--out", "runs", "--clip", "norm:1", "train.py", "--out", "x",
                               "-m", "--clip", "--", "--help"], monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert seen["target"].name == "train.py" and seen["target"].kind == "script"
    assert seen["args"] == ["--out", "x", "-m", "--clip", "--", "--help"]
    assert seen["config"].out == (tmp_path / "runs").resolve()  # absolute: the script may chdir
    assert seen["config"].clip.method == "norm"


def test_run_accepts_a_double_dash_and_python_style_m(monkeypatch, tmp_path):
    result, seen = _run_parse(["--name", "a", "--", "train.py", "x"], monkeypatch, tmp_path)
    assert result.exit_code == 0 and seen["args"] == ["x"] and seen["config"].name == "a"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "train.py").write_text("")
    for form in (["-mpkg.train", "--lr", "1"], ["-m", "pkg.train", "--lr", "1"]):
        result, seen = _run_parse(form, monkeypatch, tmp_path)
        assert result.exit_code == 0, result.output
        assert seen["target"].kind == "module" and seen["target"].name == "pkg.train"
        assert seen["args"] == ["--lr", "1"]


def test_run_config_precedence_file_then_flags(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.gradscope]\nflush_every = 7\nclip = "zclip"\n')
    result, seen = _run_parse(["--flush-every", "9", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert seen["config"].flush_every == 9 and seen["config"].clip.method == "zclip"
    (tmp_path / "other.toml").write_text("activation_every = 3\nguard = 4\n")
    result, seen = _run_parse(["--config", "other.toml", "--quiet", "--threshold",
                               "dead_fraction=0.6", "--no-tensorboard", "train.py"],
                              monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert (cfg.activation_every, cfg.guard, cfg.flush_every) == (3, 4, 100)  # no pyproject
    assert cfg.quiet and not cfg.tensorboard and cfg.thresholds.dead_fraction == 0.6
    (tmp_path / "bad.toml").write_text("flush_every = 0\n")
    result, _ = _run_parse(["--config", "bad.toml", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 2 and "bad.toml: flush_every=0" in result.output


@pytest.mark.parametrize("args, message", [
    (["missing.py"], "missing.py: no such file"),
    (["folder"], "folder: is a directory without a __main__.py"),
    (["blob.bin"], "blob.bin: not a Python file"),
    (["notes.txt"], "notes.txt: not a Python file"),
    (["-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
    (["-m", "pkg2"], "pkg2: a package without a __main__ module"),
    (["-m", "1bad"], "not a module name"),
    (["--guard", "many", "train.py"], "guard='many'"),
])
def test_run_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "train.py").write_text("print('never')\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "notes.txt").write_text("this is not python (\n")
    (tmp_path / "pkg2").mkdir()
    (tmp_path / "pkg2" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, "-m", "gradscope", "run", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "reports").exists()


def test_run_has_an_option_for_every_config_field():
    """The command line mirrors the Config: a new field without a flag fails here."""
    from dataclasses import fields

    from gradscope.cli import run
    from gradscope.config import Config

    dests = {p.name for p in run.params}
    for f in fields(Config):
        assert f.name in dests, f"gradscope run has no option for Config.{f.name}"


def test_summary_shows_the_worst_layers_of_a_deep_model(tmp_path):
    from torch import nn

    torch = pytest.importorskip("torch")
    layers = []
    for _ in range(30):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[20].bias.fill_(-100.0)  # the ReLU at 21 is dead
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, out=tmp_path, quiet=True, activation_every=1) as scope:
        for _ in range(12):
            opt.zero_grad()
            model(torch.rand(32, 8)).sum().backward()
            opt.step()
    result = CliRunner().invoke(main, ["summary", str(scope.run_dir), "--top", "5"],
                                terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "the 5 of 60 layers that most need a look" in result.output
    assert "│ 21 " in result.output or "\n21 " in result.output or " 21 " in result.output
    everything = CliRunner().invoke(main, ["summary", str(scope.run_dir), "--top", "0"],
                                    terminal_width=160)
    assert "most need a look" not in everything.output and "59" in everything.output


def test_view_serves_tensorboard_on_the_runs(tmp_path):
    import json
    import urllib.request

    from torch import nn

    torch = pytest.importorskip("torch")
    model = nn.Linear(3, 1)
    with gradscope.watch(model, out=tmp_path, name="viewed", quiet=True):
        model(torch.randn(4, 3)).sum().backward()
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "view", str(tmp_path / "viewed"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard on http://localhost:"), line + proc.stderr.read()
        url = line.split()[2]
        with urllib.request.urlopen(url + "data/runs", timeout=30) as resp:
            assert [r.split("/")[0] for r in json.loads(resp.read())] == ["viewed"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "gradscope", "view", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no tb/ folder" in bad.stderr
