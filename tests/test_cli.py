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
    result = CliRunner().invoke(
        main, ["demo", "--out", str(tmp_path), "--steps", "30"], terminal_width=120
    )
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
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "demo", "--out", str(blocker / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "cannot create the output root" in proc.stderr


def test_demo_takes_the_remedy_options(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--out",
            str(tmp_path),
            "--steps",
            "20",
            "--clip",
            "norm:0.01,per_layer",
            "--guard",
            "--guard-limit",
            "3",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    run = gradscope.load_run(run_dir)
    assert run.meta["config"]["clip"] == "norm:max=0.01,per_layer=true"
    assert run.meta["config"]["guard"] == 3
    assert (run.wide("grad_norm_clipped").to_numpy() <= 0.01 + 1e-6).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clip", "zclp"], "unknown clipping method 'zclp' (did you mean 'zclip'?)"),
        (["--guard=many"], "--guard 'many': expected no value"),
        (["--guard", "-2"], "--guard '-2': expected no value"),
        (["--guard-limit", "0"], "'--guard-limit': 0 is not in the range x>=1"),
        (["--no-guard", "--guard-limit", "4"], "--no-guard and --guard-limit 4"),
        (["--swap", "relu->nothing"], "--swap 'relu->nothing': unknown activation 'nothing'"),
    ],
)
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
    result, seen = _run_parse(
        [
            "--out",
            "runs",
            "--clip",
            "norm:1",
            "train.py",
            "--out",
            "x",
            "-m",
            "--clip",
            "--",
            "--help",
        ],
        monkeypatch,
        tmp_path,
    )
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
    (tmp_path / "pyproject.toml").write_text('[tool.gradscope]\nflush_every = 7\nclip = "zclip"\n')
    result, seen = _run_parse(["--flush-every", "9", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert seen["config"].flush_every == 9 and seen["config"].clip.method == "zclip"
    (tmp_path / "other.toml").write_text("activation_every = 3\nguard = 4\n")
    result, seen = _run_parse(
        [
            "--config",
            "other.toml",
            "--quiet",
            "--threshold",
            "dead_fraction=0.6",
            "--no-tensorboard",
            "train.py",
        ],
        monkeypatch,
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert (cfg.activation_every, cfg.guard, cfg.flush_every) == (3, 4, None)  # no pyproject
    assert cfg.quiet and not cfg.tensorboard and cfg.thresholds.dead_fraction == 0.6
    (tmp_path / "bad.toml").write_text("flush_every = 0\n")
    result, _ = _run_parse(["--config", "bad.toml", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 2 and "bad.toml: flush_every=0" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.py"], "missing.py: no such file"),
        (["folder"], "folder: is a directory without a __main__.py"),
        (["blob.bin"], "blob.bin: not a Python file"),
        (["notes.txt"], "notes.txt: not a Python file"),
        (["-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
        (["-m", "pkg2"], "pkg2: a package without a __main__ module"),
        (["-m", "1bad"], "not a module name"),
        (["--guard=many", "train.py"], "--guard 'many': expected no value"),
        (
            ["--name", "n" * 241, "train.py"],
            "--name 'nnnnnnnnnnnnnnnnnnnn...nnnnnnnnnn': 241 bytes",
        ),
        (
            ["--threshold", "dead_fraction=2", "train.py"],
            "--threshold 'dead_fraction=2': expected a number in (0, 1]",
        ),
        (["--flush-every", "0", "train.py"], "--flush-every 0: expected an integer >= 1"),
        ([], "Missing argument 'SCRIPT | -m MODULE'"),
        (["--guard"], "Missing argument 'SCRIPT | -m MODULE'"),
    ],
)
def test_run_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "train.py").write_text("print('never')\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "notes.txt").write_text("this is not python (\n")
    (tmp_path / "pkg2").mkdir()
    (tmp_path / "pkg2" / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    result = CliRunner().invoke(
        main, ["summary", str(scope.run_dir), "--top", "5"], terminal_width=160
    )
    assert result.exit_code == 0, result.output
    assert "the 5 of 60 layers that most need a look" in result.output
    assert "│ 21 " in result.output or "\n21 " in result.output or " 21 " in result.output
    everything = CliRunner().invoke(
        main, ["summary", str(scope.run_dir), "--top", "0"], terminal_width=160
    )
    assert "most need a look" not in everything.output and "59" in everything.output


def test_view_serves_tensorboard_on_the_runs(tmp_path):
    import json
    import urllib.request

    from torch import nn

    torch = pytest.importorskip("torch")
    model = nn.Linear(3, 1)
    with gradscope.watch(model, out=tmp_path, name="viewed", quiet=True):
        model(torch.randn(4, 3)).sum().backward()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "view", str(tmp_path / "viewed"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard on http://localhost:"), line + proc.stderr.read()
        url = line.split()[2]
        with urllib.request.urlopen(url + "data/runs", timeout=30) as resp:
            assert [r.split("/")[0] for r in json.loads(resp.read())] == ["viewed"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "gradscope", "view", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "no tb/ folder" in bad.stderr


# -- --guard is a flag; its limit is --guard-limit (the older --guard N still parses) -------------
@pytest.mark.parametrize(
    "args, guard, script_args",
    [
        (["--guard", "train.py", "--lr", "1"], 10, ["--lr", "1"]),  # guard=True: 10 in a row
        (["--guard", "--guard-limit", "4", "train.py"], 4, []),
        (["--guard-limit", "4", "train.py"], 4, []),
        (["--guard", "--", "train.py", "3"], 10, ["3"]),
        (["--guard", "3", "train.py"], 3, []),  # the older spellings
        (["--guard=5", "train.py"], 5, []),
        (["--guard", "true", "train.py"], 10, []),
        (["--guard", "FALSE", "train.py"], 0, []),
        (["--guard", "0", "train.py"], 0, []),
        (["train.py", "--guard", "3"], 0, ["--guard", "3"]),  # after the script: the script's
    ],
)
def test_run_guard_spellings(monkeypatch, tmp_path, args, guard, script_args):
    result, seen = _run_parse(args, monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert seen["target"].name == "train.py" and seen["args"] == script_args
    assert seen["config"].guard == guard


def test_run_no_guard_overrides_the_project_table(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.gradscope]\nguard = 4\n")
    result, seen = _run_parse(["train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0 and seen["config"].guard == 4
    result, seen = _run_parse(["--no-guard", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0 and seen["config"].guard == 0
    result, seen = _run_parse(["--guard-limit", "2", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0 and seen["config"].guard == 2


@pytest.mark.parametrize(
    "args, max_skips",
    [
        ([], 0),
        (["--guard"], 10),
        (["--guard", "--steps", "5"], 10),
        (["--steps", "5", "--guard"], 10),
        (["--guard-limit", "3"], 3),
        (["--guard", "3"], 3),
        (["--guard=2"], 2),
        (["--guard", "off"], 0),
        (["--no-guard"], 0),
    ],
)
def test_demo_guard_spellings(args, max_skips):
    from gradscope.cli import demo, remedy_config

    with demo.make_context("demo", args) as ctx:
        p = ctx.params
        opts = remedy_config(p["clip"], p["guard"], p["guard_limit"], p["swap"], p["recycle"])
    assert gradscope.Config(guard=opts["guard"]).guard == max_skips


def test_run_guard_flag_runs_the_script_watched(tmp_path):
    """The reported failure: `gradscope run --guard train.py` said the script was missing."""
    (tmp_path / "train.py").write_text(
        "import torch\n"
        "model = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); model(torch.ones(4, 2)).sum().backward(); opt.step()\n"
        "print('trained')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "run", "--guard", "--name", "g", "--quiet", "train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "trained\n"
    run = gradscope.load_run(tmp_path / "reports" / "g")
    assert run.meta["config"]["guard"] == 10


# -- thresholds and names are checked before the script starts ---------------------------------
def test_run_threshold_flags_override_one_threshold_of_the_project_table(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.gradscope]\nthresholds = { dead_fraction = 0.6, patience = 4 }\n"
    )
    result, seen = _run_parse(["--threshold", "patience=2", "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    t = seen["config"].thresholds
    assert (t.dead_fraction, t.patience, t.history) == (0.6, 2, 50)


def test_run_thresholds_are_parsed_as_their_type(monkeypatch, tmp_path):
    result, seen = _run_parse(
        [
            "--threshold",
            "patience=5",
            "--threshold",
            "dead_fraction=1",
            "--threshold",
            "merge_gap=0",
            "train.py",
        ],
        monkeypatch,
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    t = seen["config"].thresholds
    assert (t.patience, t.dead_fraction, t.merge_gap) == (5, 1.0, 0)
    assert type(t.patience) is int and type(t.dead_fraction) is float


@pytest.mark.parametrize(
    "pair, message",
    [
        ("dead_fraction=2", "--threshold 'dead_fraction=2': expected a number in (0, 1]"),
        ("dead_fraction=0", "--threshold 'dead_fraction=0': expected a number in (0, 1]"),
        ("saturation_fraction=1.5", "expected a number in (0, 1]"),
        ("spike_ratio=0.5", "--threshold 'spike_ratio=0.5': expected a number >= 1"),
        ("depth_explode_ratio=1", "expected a number > 1"),
        ("depth_vanish_ratio=1", "--threshold 'depth_vanish_ratio=1': expected a number in (0, 1)"),
        ("update_low=0", "expected a number > 0"),
        ("update_warmup=-1", "--threshold 'update_warmup=-1': expected an integer >= 0"),
        ("patience=2.5", "--threshold 'patience=2.5': expected an integer >= 1"),
        ("loss_spike_z=nan", "--threshold 'loss_spike_z=nan': expected a number > 0"),
        ("dead_fracton=0.5", "unknown name 'dead_fracton' (did you mean 'dead_fraction'?)"),
        ("dead_fraction", "--threshold 'dead_fraction': expected NAME=NUMBER"),
        ("update_low=0.5", "--threshold: update_low=0.5 is not below update_high=0.1"),
    ],
)
def test_run_threshold_out_of_range_is_a_usage_error(monkeypatch, tmp_path, pair, message):
    result, seen = _run_parse(["--threshold", pair, "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 2 and not seen
    assert message in result.output and "Traceback" not in result.output


def test_run_name_length_is_counted_in_bytes(monkeypatch, tmp_path):
    result, seen = _run_parse(["--name", "a" * 240, "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0 and seen["config"].name == "a" * 240
    result, seen = _run_parse(["--name", "é" * 120, "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 0  # 120 characters, 240 bytes in UTF-8
    result, seen = _run_parse(["--name", "é" * 121, "train.py"], monkeypatch, tmp_path)
    assert result.exit_code == 2 and not seen
    assert "--name 'éééééééééééééééééééé...éééééééééé': 242 bytes" in result.output
    assert "expected at most 240" in result.output


def test_no_arguments_prints_the_help(capsys):
    from gradscope.cli import entry

    assert entry([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: gradscope") and "error" not in err and "Commands:" in err


# -- view: any run directory name reaches TensorBoard -------------------------------------------
def _watched_run(out, name):
    from torch import nn

    torch = pytest.importorskip("torch")
    model = nn.Linear(3, 1)
    with gradscope.watch(model, out=out, name=name, quiet=True, report=False) as scope:
        model(torch.randn(4, 3)).sum().backward()
    return scope.run_dir


def test_view_serves_runs_whose_names_have_commas_and_colons(tmp_path):
    import json
    import os
    import time
    import urllib.request

    names = ["lr=0.1,bs=32", "seed:1", "plain"]
    runs = [_watched_run(tmp_path / "runs", n) for n in names]
    assert [r.name for r in runs] == names
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "view", *map(str, runs), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard on http://localhost:"), line + proc.stderr.read()
        url = line.split()[2]
        deadline = time.monotonic() + 60
        while True:  # TensorBoard loads the runs in the background
            with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=30) as resp:
                tags = json.loads(resp.read())
            if len(tags) == len(names) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(tags) == sorted(names)
        assert all("grad_norm/weight" in tags[n] for n in names)  # the data, through the names
        with urllib.request.urlopen(url + "data/runs", timeout=30) as resp:
            assert sorted(json.loads(resp.read())) == sorted(names)
        assert len(list(temp.iterdir())) == 1  # the folder of links, while it serves
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # SIGTERM stops it cleanly...
    assert list(temp.iterdir()) == []  # ...and the links are gone
    assert all(any((r / "tb").iterdir()) for r in runs)  # not what they pointed to


def test_view_links_are_removed_without_touching_the_runs(tmp_path):
    from gradscope.cli import link_runs, unlink_runs

    tb = tmp_path / "run" / "tb"
    tb.mkdir(parents=True)
    (tb / "events").write_text("x")
    logdir, links = link_runs({"a,b:c": tb})
    assert logdir is not None and [p.name for p in logdir.iterdir()] == ["a,b:c"]
    assert (logdir / "a,b:c" / "events").read_text() == "x"
    unlink_runs(logdir, links)
    assert not logdir.exists() and (tb / "events").read_text() == "x"


def test_view_without_symlinks_falls_back_to_safe_spec_names(tmp_path, monkeypatch):
    import os
    import tempfile
    from pathlib import Path

    from gradscope.cli import link_runs, spec_safe

    def refuse(self, target, target_is_directory=False):
        raise OSError("symbolic links are not allowed here")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert link_runs({"a": tmp_path}) == (None, [])
    assert os.listdir(tmp_path) == []  # the empty folder is gone too
    assert spec_safe("lr=0.1,bs=32:x") == "lr=0.1_bs=32_x"
