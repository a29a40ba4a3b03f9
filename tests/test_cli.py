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
