"""``import gradscope`` stays light: no pandas, pyarrow, matplotlib or tensorboard."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, gradscope\n"
        "heavy = [m for m in ('pandas', 'pyarrow', 'matplotlib', 'tensorboard', 'rich', 'jinja2',"
        " 'click', 'torch._dynamo') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface():
    import gradscope

    assert sorted(gradscope.__all__) == ["Config", "NonfiniteStepsError", "Run", "Scope",
                                         "__version__", "load_run", "swap_activations", "watch"]
    for name in gradscope.__all__:
        assert getattr(gradscope, name) is not None
