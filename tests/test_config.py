"""Config: one place that parses and checks every setting, with errors that name the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

import gradscope
from gradscope import Config
from gradscope.config import type_matches


def test_defaults():
    cfg = Config()
    assert cfg.out == Path("reports") and cfg.flush_every == 100 and cfg.activation_every == 10
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
        'guard = 4\nthresholds = { dead_fraction = 0.6 }\n'
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
    (tmp_path / "pyproject.toml").write_text('[tool.gradscope]\nflush_evry = 3\n')
    with pytest.raises(TypeError, match="did you mean 'flush_every'"):
        gradscope.watch(nn.Linear(2, 2))
    (tmp_path / "pyproject.toml").write_text('[tool.gradscope\n')
    with pytest.raises(ValueError, match="cannot read"):
        gradscope.watch(nn.Linear(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["pyproject.toml"]
