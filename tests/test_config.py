"""Config: one place that parses and checks every setting, with errors that name the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

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
