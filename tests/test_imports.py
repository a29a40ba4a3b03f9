"""``import gradscope`` stays light: no torch, pandas, pyarrow, matplotlib or tensorboard until a
name that needs them is used (PEP 562 lazy attributes), and checking a Config needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = (
    "torch",
    "pandas",
    "pyarrow",
    "matplotlib",
    "tensorboard",
    "rich",
    "jinja2",
    "click",
    "torch._dynamo",
)


def _imported_after(code: str) -> list[str]:
    """The modules of HEAVY that a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_is_light():
    assert _imported_after("import gradscope") == []


def test_notebook_support_loads_only_under_ipython(tmp_path):
    """A script that watches, trains and reads its run back never imports IPython (nor
    ipykernel, nbclient, nbformat, zmq), and gradscope.notebook loads only when something asks
    for a notebook's HTML (``_repr_html_``), which needs no IPython either."""
    code = (
        "import torch, gradscope\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(3, 3), nn.ReLU())\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        f"with gradscope.watch(m, out={str(tmp_path)!r}, quiet=True) as s:\n"
        "    for _ in range(3):\n"
        "        opt.zero_grad(); m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "r = s.load(); repr(r); repr(s)\n"
        "assert 'gradscope.notebook' not in sys.modules\n"
        "assert 'img' in r._repr_html_()\n"
        "for name in ('IPython', 'ipykernel', 'nbclient', 'nbformat', 'zmq'):\n"
        "    assert name not in sys.modules, name\n"
    )
    _imported_after(code)


def test_checking_a_config_does_not_import_torch():
    code = (
        "import gradscope\n"
        "from gradscope import Config\n"
        "cfg = Config(clip='zclip:z=3', guard=True, swap='relu->leaky_relu:0.1;tanh->relu',\n"
        "             recycle=True, thresholds={'dead_fraction': 0.6}, name='run,1:a')\n"
        "assert cfg.guard == 10 and str(cfg.swap[0]) == 'relu->leaky_relu:0.1'\n"
        "try:\n"
        "    Config.from_kwargs(thresholds={'dead_fraction': 2})\n"
        "except ValueError as exc:\n"
        "    assert 'dead_fraction=2' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('accepted')\n"
        "import gradscope.remedies, gradscope.remedies.spec\n"
    )
    assert _imported_after(code) == []


def test_a_swap_rule_loads_torch_when_it_makes_a_module():
    from torch import nn

    from gradscope.remedies.spec import parse_swap

    (rule,) = parse_swap("relu->leaky_relu:0.2")
    assert rule.source_type is nn.ReLU and rule.matches(nn.ReLU()) and not rule.matches(nn.GELU())
    made = rule.make(nn.ReLU())
    assert type(made) is nn.LeakyReLU and made.negative_slope == 0.2


def test_public_surface():
    import gradscope

    assert sorted(gradscope.__all__) == [
        "Config",
        "NonfiniteStepsError",
        "Run",
        "Scope",
        "__version__",
        "load_run",
        "swap_activations",
        "watch",
    ]
    for name in gradscope.__all__:
        assert getattr(gradscope, name) is not None
    assert set(gradscope.__all__) <= set(dir(gradscope))


def test_lazy_names_are_the_modules_own():
    import gradscope
    import gradscope.config
    import gradscope.load
    import gradscope.remedies
    import gradscope.remedies.swap
    import gradscope.scope
    from gradscope import Config, NonfiniteStepsError, Run, Scope, swap_activations

    assert Config is gradscope.Config is gradscope.config.Config
    assert Scope is gradscope.scope.Scope and Run is gradscope.load.Run
    assert NonfiniteStepsError is gradscope.remedies.NonfiniteStepsError
    assert issubclass(NonfiniteStepsError, RuntimeError)
    assert swap_activations is gradscope.remedies.swap_activations
    assert swap_activations is gradscope.remedies.swap.swap_activations
    with pytest.raises(AttributeError, match="module 'gradscope' has no attribute 'Scop'"):
        gradscope.Scop  # noqa: B018
    with pytest.raises(ImportError):
        from gradscope import nothing_here  # noqa: F401


def test_remedies_torch_side_names_load_on_first_use():
    import gradscope.remedies as remedies
    from gradscope.remedies import FUNCTIONAL_NOTE, make_clipper
    from gradscope.remedies.clipping import make_clipper as from_clipping
    from gradscope.remedies.swap import FUNCTIONAL_NOTE as from_swap

    assert make_clipper is from_clipping and FUNCTIONAL_NOTE is from_swap
    with pytest.raises(AttributeError, match="has no attribute 'make_clippr'"):
        remedies.make_clippr  # noqa: B018
