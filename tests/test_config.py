"""Config: one place that parses and checks every setting, with errors that name the value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

import gradscope
from gradscope import Config
from gradscope.config import type_matches


def test_defaults():
    cfg = Config()
    assert cfg.out == Path("reports") and cfg.flush_every is None and cfg.activation_every == 10
    assert cfg.update_every is None and cfg.step_on == "auto"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"flush_every": 0}, ValueError, r"flush_every=0: expected an integer >= 1"),
        ({"flush_every": True}, TypeError, r"flush_every=True: expected an integer"),
        ({"update_every": -3}, ValueError, r"update_every=-3"),
        ({"flush_secs": 0}, ValueError, r"flush_secs=0: expected a finite number in \(0, inf\]"),
        ({"flush_secs": float("nan")}, ValueError, r"flush_secs=nan"),
        ({"tanh_saturation": 1.5}, ValueError, r"tanh_saturation=1.5: expected .*\[0, 1\]"),
        ({"sigmoid_saturation": "hi"}, TypeError, r"sigmoid_saturation='hi': expected a number"),
        ({"include": 3}, TypeError, r"include=3: expected a glob pattern"),
        ({"exclude": ["ok", ""]}, TypeError, r"exclude: '' is not a glob pattern"),
        ({"include_types": [3]}, TypeError, r"include_types: 3 is not a module type"),
        ({"tensorboard": "yes"}, TypeError, r"tensorboard='yes': expected True or False"),
        ({"out": 5}, TypeError, r"out=5: expected a path"),
        ({"name": "a/b"}, ValueError, r"name='a/b': expected a plain directory name"),
    ],
)
def test_bad_values_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        Config.from_kwargs(**kwargs)


def test_unknown_key_lists_the_accepted_ones():
    with pytest.raises(TypeError) as info:
        Config.from_kwargs(activation_evry=2)
    text = str(info.value)
    assert "'activation_evry'" in text and "did you mean 'activation_every'" in text
    assert "accepted: " in text and "flush_every" in text


def test_strings_become_tuples_and_json():
    cfg = Config.from_kwargs(include="enc*", exclude_types=nn.Dropout, out="x/y")
    assert cfg.include == ("enc*",) and cfg.exclude_types == (nn.Dropout,)
    assert cfg.to_json()["exclude_types"] == ["Dropout"] and cfg.to_json()["out"] == "x/y"
    assert cfg.replace(flush_every=7).flush_every == 7
    with pytest.raises(TypeError, match="unknown gradscope option"):
        cfg.replace(nope=1)


def test_type_matches_classes_and_names_in_the_mro():
    class MyReLU(nn.ReLU):
        pass

    assert type_matches(MyReLU(), ("ReLU",)) and type_matches(MyReLU(), (nn.ReLU,))
    assert not type_matches(nn.Tanh(), ("ReLU", nn.Sigmoid))


def test_pyproject_table_sets_project_defaults_and_keywords_win(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.gradscope]\nout = "runs"\nclip = "zclip:z=3"\n'
        "guard = 4\nthresholds = { dead_fraction = 0.6 }\n"
    )
    work = tmp_path / "src" / "pkg"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # found from a subfolder, as from anywhere in the project
    model = nn.Linear(2, 2)
    with gradscope.watch(model, quiet=True) as scope:
        pass
    cfg = scope.config
    assert str(cfg.clip) == "zclip:z=3,alpha=0.97,warmup=25,factor=1,max=none,per_layer=false"
    assert cfg.guard == 4 and cfg.thresholds.dead_fraction == 0.6
    assert scope.run_dir.parent == work / "runs"
    with gradscope.watch(model, quiet=True, clip=None, out=tmp_path / "o") as scope:
        pass
    assert scope.config.clip is None and scope.config.guard == 4


def test_bad_pyproject_option_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.gradscope]\nclip = "zclp"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"pyproject\.toml \[tool\.gradscope\]: clip='zclp'"):
        gradscope.watch(nn.Linear(2, 2))
    (tmp_path / "pyproject.toml").write_text("[tool.gradscope]\nflush_evry = 3\n")
    with pytest.raises(TypeError, match="did you mean 'flush_every'"):
        gradscope.watch(nn.Linear(2, 2))
    (tmp_path / "pyproject.toml").write_text("[tool.gradscope\n")
    with pytest.raises(ValueError, match="cannot read"):
        gradscope.watch(nn.Linear(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["pyproject.toml"]


# -- run names: one directory name the file system can create ----------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "a" * 241,
            "name='aaaaaaaaaaaaaaaaaaaa...aaaaaaaaaa': 241 bytes long in the file system "
            "encoding (utf-8); expected at most 240",
        ),
        ("€" * 81, "243 bytes long"),  # 3 bytes each in UTF-8
        ("a\ud800", "not encodable in the file system encoding"),
    ],
)
def test_names_that_no_file_system_stores_are_refused(out, name, message):
    import sys

    if sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
        pytest.skip("byte counts worked out for UTF-8")
    with pytest.raises(ValueError) as info:
        gradscope.watch(nn.Linear(2, 2), out=out, name=name)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()  # nothing written


def test_the_longest_name_leaves_room_for_a_suffix(out):
    model = nn.Linear(2, 2)
    name = "r" * 240
    with gradscope.watch(model, out=out, name=name, quiet=True, report=False) as first:
        pass
    with gradscope.watch(model, out=out, name=name, quiet=True, report=False) as second:
        pass
    assert first.run_dir.name == name and second.run_dir.name == name + "-1"


# -- thresholds: each within the range its rule can use ----------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dead_fraction": 1}, {"dead_fraction": 1.0}),  # whole layers dead only; int -> float
        (
            {"saturation_fraction": 1.0, "spike_ratio": 1, "loss_spike_max": 1.0},
            {"saturation_fraction": 1.0, "spike_ratio": 1.0, "loss_spike_max": 1.0},
        ),
        (
            {
                "depth_vanish_ratio": 0.999,
                "weight_vanish_ratio": 1e-9,
                "depth_explode_ratio": 1.001,
            },
            {
                "depth_vanish_ratio": 0.999,
                "weight_vanish_ratio": 1e-9,
                "depth_explode_ratio": 1.001,
            },
        ),
        (
            {"update_warmup": 0, "merge_gap": 0, "dead_min_samples": 1},
            {"update_warmup": 0, "merge_gap": 0, "dead_min_samples": 1},
        ),
        ({"min_history": 50, "history": 50}, {"min_history": 50, "history": 50}),
        (
            {"patience": np.int64(4), "dead_fraction": np.float32(0.5)},  # NumPy numbers: converted
            {"patience": 4, "dead_fraction": 0.5},
        ),
    ],
)
def test_thresholds_at_the_ends_of_their_ranges(overrides, expected):
    t = Config.from_kwargs(thresholds=overrides).thresholds
    got = {k: getattr(t, k) for k in expected}
    assert got == expected and all(type(got[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dead_fraction": 2}, "thresholds: dead_fraction=2: expected a number in (0, 1]"),
        ({"dead_fraction": 0}, "thresholds: dead_fraction=0: expected a number in (0, 1]"),
        ({"saturation_fraction": 1.01}, "saturation_fraction=1.01: expected a number in (0, 1]"),
        ({"spike_ratio": 0.99}, "spike_ratio=0.99: expected a number >= 1"),
        ({"spike_once_ratio": -1}, "spike_once_ratio=-1: expected a number >= 1"),
        ({"loss_spike_ratio": 0.5}, "loss_spike_ratio=0.5: expected a number >= 1"),
        ({"loss_spike_max": 0.9}, "loss_spike_max=0.9: expected a number >= 1"),
        ({"depth_explode_ratio": 1}, "depth_explode_ratio=1: expected a number > 1"),
        ({"depth_vanish_ratio": 1}, "depth_vanish_ratio=1: expected a number in (0, 1)"),
        ({"weight_vanish_ratio": 0}, "weight_vanish_ratio=0: expected a number in (0, 1)"),
        ({"spike_z": 0}, "spike_z=0: expected a number > 0"),
        ({"loss_spike_z": float("inf")}, "loss_spike_z=inf: expected a number > 0"),
        ({"update_high": -0.1}, "update_high=-0.1: expected a number > 0"),
        ({"patience": 0}, "patience=0: expected an integer >= 1"),
        ({"history": 50.0}, "history=50.0: expected an integer >= 1"),
        ({"dead_min_samples": True}, "dead_min_samples=True: expected an integer >= 1"),
        ({"update_warmup": -1}, "update_warmup=-1: expected an integer >= 0"),
        ({"merge_gap": "5"}, "merge_gap='5': expected an integer >= 0"),
        ({"min_history": 60}, "min_history=60 is larger than history=50"),
        ({"update_low": 0.1}, "update_low=0.1 is not below update_high=0.1"),
    ],
)
def test_thresholds_out_of_range_are_one_line_errors(out, overrides, message):
    with pytest.raises(ValueError) as info:
        gradscope.watch(nn.Linear(2, 2), out=out, thresholds=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_threshold_out_of_range_in_the_project_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.gradscope]\nthresholds = { dead_fraction = 2 }\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"pyproject\.toml \[tool\.gradscope\]: thresholds: "
        r"dead_fraction=2: expected a number in \(0, 1\]",
    ):
        gradscope.watch(nn.Linear(2, 2))


def test_every_threshold_documents_its_range():
    import dataclasses
    import re

    from gradscope.rules.thresholds import Thresholds

    doc = " ".join(Thresholds.__doc__.split())
    defaults = Thresholds()
    for f in dataclasses.fields(Thresholds):
        entry = re.search(rf" {f.name}: (.*?)(?= [a-z_]+: [A-Z.]|$)", doc)
        assert entry is not None, f.name
        accepted = str(Thresholds.range_of(f.name))
        assert accepted[0].upper() + accepted[1:] in entry.group(1), (f.name, accepted)
        assert Thresholds.range_of(f.name).check(getattr(defaults, f.name)) is not None


def test_a_pyproject_whose_tool_is_not_a_table_has_no_options(tmp_path):
    from gradscope.config import file_options, project_options

    (tmp_path / "pyproject.toml").write_text('tool = 3\n[project]\nname = "x"\n')
    assert project_options(tmp_path) == ({}, None)
    (tmp_path / "opts.toml").write_text("tool = 3\n")
    with pytest.raises(TypeError, match="unknown gradscope option 'tool'"):
        Config.from_kwargs(**file_options(tmp_path / "opts.toml"))
