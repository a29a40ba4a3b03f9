"""Notebooks: cells re-run and interrupted, the live view, and the rich display.

The cells run in a real IPython shell, in this process (``InteractiveShell.run_cell``: the same
cell events a Jupyter kernel fires); ``tests/test_notebook_kernel.py`` runs the example notebook
on a real kernel. Each case is checked against an oracle: the gradient norms the loop itself
computed, hook counts against a single ``watch()``, and the run directories read back.
"""

from __future__ import annotations

import builtins
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.load import load_run

from conftest import hook_counts

IPython = pytest.importorskip("IPython")
from IPython.core.displaypub import CapturingDisplayPublisher  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config as TraitletsConfig  # noqa: E402

SETUP = """
import torch, gradscope
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(32, 8), torch.randn(32, 1)
norms, losses = [], []  # the loop's own gradient norms and losses: the oracles
between = lambda: None  # the user's code between backward and step

def one_step():
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    between()
    norms.append([torch.linalg.vector_norm(p.grad).item() for p in model.parameters()])
    losses.append(loss.item())
    opt.step()
"""


class FakeKernel:
    """Makes the in-process shell look like a Jupyter kernel's (rich display on)."""

    def get_parent(self) -> dict[str, Any]:
        return {"metadata": {}, "content": {}}


@pytest.fixture
def shell(tmp_path: Path):
    """A fresh IPython shell (no history file), the only one in the process, gone afterwards
    with everything it changed (display hook, excepthook, builtins)."""
    from gradscope import notebook

    saved = (sys.displayhook, sys.excepthook, dict(vars(builtins)))
    config = TraitletsConfig()
    config.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=config)
    sh.user_ns["OUT"] = str(tmp_path / "runs")
    yield sh
    for scope in list(gradscope.scope._open_scopes):
        scope.close()
    InteractiveShell.clear_instance()
    notebook.Cells._instance = None
    sys.displayhook, sys.excepthook = saved[0], saved[1]
    now = vars(builtins)
    for name in [n for n in now if n not in saved[2]]:
        del now[name]
    for name, value in saved[2].items():
        if now.get(name) is not value:
            now[name] = value


def scope_name(sh: InteractiveShell) -> str:
    return sh.user_ns["scope"].run_dir.name


def run(sh: InteractiveShell, code: str, cell_id: str | None = None) -> Any:
    """One cell; returns the exception it raised (None if it ran through)."""
    result = sh.run_cell(code, store_history=True, cell_id=cell_id)
    return result.error_before_exec or result.error_in_exec


def grad_table(run_dir: Any) -> list[float]:
    """Every step's gradient norms, parameters in forward order, flattened (as the oracle)."""
    wide = load_run(run_dir).wide("grad_norm", kind="param")
    assert list(wide.index) == list(range(len(wide)))
    return [float(v) for row in wide.to_numpy() for v in row]


def flat(norms: list[list[float]]) -> list[float]:
    return [v for row in norms for v in row]


def test_interrupted_cell_keeps_the_run_open_and_goes_on(shell, capsys):
    """The stop button in a training cell of a handle-style scope: the scope stays open, says
    so once, and the next cell goes on from the next step; every step's gradient norms match
    the loop's own, the interrupted iteration included where it reached the optimizer."""
    run(shell, SETUP)
    run(shell, "scope = gradscope.watch(model, out=OUT, flush_every=10)")
    err = run(shell, "for i in range(25):\n    one_step()\n    if i == 16: raise KeyboardInterrupt")
    assert isinstance(err, KeyboardInterrupt)
    scope = shell.user_ns["scope"]
    assert not scope.closed and scope.steps == 17
    assert "was interrupted at step 17" in capsys.readouterr().err
    assert run(shell, "for i in range(8):\n    one_step()") is None
    run(shell, "scope.close()")
    r = load_run(scope.run_dir)
    assert r.state == "completed" and r.steps == 25
    assert [e["event"] for e in r.events if e["event"].startswith("cell_")] == ["cell_interrupted"]
    assert grad_table(scope.run_dir) == pytest.approx(flat(shell.user_ns["norms"]), rel=1e-5)


@pytest.mark.parametrize("where", ["forward", "backward", "between", "optimizer"])
def test_interrupt_mid_step(shell, where):
    """Interrupted in the middle of a step (inside a layer's forward, inside the backward pass,
    in the user's code between backward and step, inside ``optimizer.step()`` after
    gradscope's pre-hook): the steps after it are recorded as if nothing happened, and the
    gradient norms and losses match the loop's own, step for step."""
    run(shell, SETUP)
    run(
        shell,
        "stop = [False]\n"
        "def boom(*a):\n"
        "    if stop[0]:\n"
        "        stop[0] = False\n"
        "        raise KeyboardInterrupt\n"
        f"where = {where!r}\n"
        "if where == 'forward': model[2].register_forward_hook(boom)\n"
        "if where == 'backward': model[2].weight.register_hook(lambda g: boom())\n"
        "if where == 'between': between = boom\n",
    )
    run(shell, "scope = gradscope.watch(model, out=OUT, flush_every=7)")
    if where == "optimizer":  # after gradscope's pre-hook: the step began, its post never comes
        run(shell, "opt.register_step_pre_hook(boom)")
    run(shell, "for i in range(10):\n    one_step()")
    err = run(shell, "stop[0] = True\nfor i in range(10):\n    one_step()")
    assert isinstance(err, KeyboardInterrupt)
    run(shell, "for i in range(12):\n    one_step()")
    run(shell, "scope.close()")
    scope = shell.user_ns["scope"]
    norms = shell.user_ns["norms"]
    table = grad_table(scope.run_dir)
    # the loop appends to its oracles after backward and after its own code there: an
    # iteration interrupted before has no entry and is no step; one interrupted in
    # optimizer.step() has both
    assert len(norms) == 22 + (where == "optimizer")
    assert table == pytest.approx(flat(norms), rel=1e-5)
    r = load_run(scope.run_dir)
    loss = r.wide("loss")
    assert list(loss.index) == list(range(len(norms)))
    assert loss.iloc[:, 0].tolist() == pytest.approx(shell.user_ns["losses"], rel=1e-6)
    assert r.steps == len(norms) and r.state == "completed"
    assert not [e for e in r.events if e["event"] == "internal_error"]


def test_rerun_watch_on_same_model_closes_the_earlier_run(shell, capsys):
    """``watch()`` run again on the same model while the first scope is open: the first
    closes with the status of the last cell that trained it (here interrupted), its hooks come
    off, and the model carries exactly one scope's hooks."""
    run(shell, SETUP)
    before = hook_counts(shell.user_ns["model"])
    cell = "scope = gradscope.watch(model, out=OUT)"
    run(shell, cell)
    single = hook_counts(shell.user_ns["model"])
    run(shell, "for i in range(5):\n    one_step()\nraise KeyboardInterrupt")
    first = shell.user_ns["scope"]
    capsys.readouterr()
    run(shell, cell)
    second = shell.user_ns["scope"]
    assert first.closed and not second.closed
    assert "closed the earlier run" in capsys.readouterr().err
    assert hook_counts(shell.user_ns["model"]) == single != before
    r = load_run(first.run_dir)
    assert r.state == "interrupted" and r.steps == 5
    assert r.events[-1]["event"] == "superseded"
    run(shell, "for i in range(4):\n    one_step()\nscope.close()")
    assert load_run(second.run_dir).steps == 4
    assert hook_counts(shell.user_ns["model"]) == before


def test_rerun_cell_with_a_new_model_closes_the_earlier_run(shell):
    """A cell that builds a new model and watches it, run again: the earlier scope (on the old
    model) is closed, completed since its last training cell ran through; a scope opened by a
    different cell stays open."""
    run(shell, SETUP)
    cell = (
        "model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.05)\n"
        "scope = gradscope.watch(model, out=OUT)"
    )
    run(shell, "other = gradscope.watch(nn.Linear(3, 3), out=OUT)")
    run(shell, cell, cell_id="cell-1")
    run(shell, "for i in range(3):\n    one_step()")
    first = shell.user_ns["scope"]
    run(shell, cell, cell_id="cell-1")
    assert first.closed and load_run(first.run_dir).state == "completed"
    assert not shell.user_ns["scope"].closed and not shell.user_ns["other"].closed
    # the same source in another cell (another id) is another cell
    second = shell.user_ns["scope"]
    run(shell, cell, cell_id="cell-2")
    assert not second.closed
    run(shell, "scope.close(); other.close()")
    second.close()


def test_with_block_interrupted_closes_interrupted(shell):
    """The context-manager form: the stop button closes the run, interrupted, at once."""
    run(shell, SETUP)
    err = run(
        shell,
        "with gradscope.watch(model, out=OUT) as scope:\n"
        "    for i in range(30):\n"
        "        one_step()\n"
        "        if i == 11: raise KeyboardInterrupt",
    )
    assert isinstance(err, KeyboardInterrupt)
    scope = shell.user_ns["scope"]
    assert scope.closed
    r = load_run(scope.run_dir)
    assert r.state == "interrupted" and r.steps == 12
    assert (scope.run_dir / "report.html").exists()


def test_failed_cell_then_kernel_exit_closes_failed(shell):
    """A handle never closed whose last training cell raised: at interpreter exit (the kernel
    shutting down) it closes as failed; a later cell that trained through makes it completed."""
    run(shell, SETUP)
    run(shell, "scope = gradscope.watch(model, out=OUT)")
    run(shell, "one_step()\nraise RuntimeError('bad batch')")
    scope = shell.user_ns["scope"]
    assert scope._outcome == "failed"
    r = load_run(scope.run_dir)
    assert next(e for e in r.events if e["event"] == "cell_failed")["error"] == (
        "RuntimeError: bad batch"
    )
    run(shell, "one_step()")
    assert scope._outcome == "completed"
    run(shell, "1/0")  # a cell that does not train: no say in the run's status
    scope._at_exit()
    assert load_run(scope.run_dir).state == "completed"


# -- the live view --------------------------------------------------------------------------------
class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] = []
        self.imgs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.classes += (a.get("class") or "").split()
        if tag == "img":
            self.imgs.append(a.get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(markup: str) -> _Html:
    p = _Html()
    p.feed(markup)
    return p


@pytest.fixture
def kernel(shell):
    """The shell as a kernel's: rich display on, display messages captured."""
    shell.kernel = FakeKernel()
    shell.display_pub = CapturingDisplayPublisher()
    return shell


def test_live_view_updates_one_area_per_cell(kernel, capsys):
    """In a kernel: one display area per training cell, updated in place at each flush (the
    same display id), no finding lines on stderr, and the summary (findings table, heatmap)
    in the area at the end."""
    run(kernel, SETUP)
    run(kernel, "scope = gradscope.watch(model, out=OUT, flush_every=20)")
    # a NaN in one batch at step 30: a finding at the flush after it
    run(
        kernel,
        "for i in range(60):\n    if i == 30: x[0, 0] = float('nan')\n    one_step()\n"
        "    x[0, 0] = 1.0",
    )
    run(kernel, "for i in range(40):\n    one_step()\nscope.close()")
    outputs = kernel.display_pub.outputs
    ids = [o["transient"]["display_id"] for o in outputs]
    updates = [o["update"] for o in outputs]
    # cell 1: 3 flushes -> a new area, then 2 updates; cell 2: 2 flushes, the last flush at
    # close and the summary -> a new area, then 3 updates
    assert updates == [False, True, True, False, True, True, True]
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    live = parse(outputs[2]["data"]["text/html"])
    text = "".join(live.text)
    assert "gradscope-live" in live.classes and "59 steps" in text  # flushed in the 60th
    assert "gradscope-findings" in live.classes and "nonfinite" in text
    final = parse(outputs[-1]["data"]["text/html"])
    assert "gradscope-findings" in final.classes and final.imgs[0].startswith("data:image/png")
    assert "completed" in "".join(final.text)
    err = capsys.readouterr().err
    assert "gradscope: warning" not in err and "finding(s)" not in err
    # a front end without HTML (jupyter console) gets the same as text
    text = outputs[-1]["data"]["text/plain"]
    assert text.startswith(f"gradscope {scope_name(kernel)}: completed, 100 steps")
    assert "nonfinite" in text and "Try: " in text


def test_live_view_shows_an_interrupt(kernel):
    run(kernel, SETUP)
    run(kernel, "scope = gradscope.watch(model, out=OUT, flush_every=5)")
    run(kernel, "for i in range(12):\n    one_step()\nraise KeyboardInterrupt")
    last = parse(kernel.display_pub.outputs[-1]["data"]["text/html"])
    text = "".join(last.text)
    assert "interrupted" in text and "still open" in text
    # training goes on in the next cell: its area no longer says so
    run(kernel, "for i in range(10):\n    one_step()")
    text = "".join(parse(kernel.display_pub.outputs[-1]["data"]["text/html"]).text)
    assert "running" in text and "still open" not in text
    run(kernel, "scope.close()")


def test_quiet_shows_nothing(kernel):
    run(kernel, SETUP)
    run(
        kernel,
        "with gradscope.watch(model, out=OUT, flush_every=5, quiet=True):\n"
        "    for i in range(12):\n        one_step()",
    )
    assert kernel.display_pub.outputs == []


# -- rich display ---------------------------------------------------------------------------------
def test_rich_display_of_scope_and_run(tmp_path):
    """``_repr_html_`` of an open scope, a closed one and a loaded run: the header, the
    findings table with what to try, an inline PNG heatmap; plain repr stays one short line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    with gradscope.watch(model, out=tmp_path, flush_every=20, quiet=True) as scope:
        for i in range(50):
            opt.zero_grad()
            # a NaN in one batch (step 25): an error finding
            nn.functional.mse_loss(model(x * (float("nan") if i == 25 else 1.0)), y).backward()
            opt.step()
        open_html = parse(scope._repr_html_())
    assert "running" in "".join(open_html.text)
    assert open_html.imgs and open_html.imgs[0].startswith("data:image/png;base64,")
    run_ = scope.load()
    for markup in (scope._repr_html_(), run_._repr_html_()):
        page = parse(markup)
        text = "".join(page.text)
        assert "gradscope-findings" in page.classes and "gradscope-heatmap" in page.classes
        assert "completed" in text and "50 steps" in text
        for f in run_.findings:
            assert f["kind"] in text and f["suggestion"] in text
    assert any(f["severity"] == "error" for f in run_.findings)
    for obj in (scope, run_):
        assert "\n" not in repr(obj) and len(repr(obj)) < 200


def test_rich_display_never_raises(tmp_path, monkeypatch):
    from gradscope import notebook

    model = nn.Linear(3, 3)
    scope = gradscope.watch(model, out=tmp_path, quiet=True)
    scope.close()

    def broken(**kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(notebook, "summary_html", broken)
    markup = scope._repr_html_()
    assert "boom" in markup and "gradscope.Scope" in markup


def test_inline_heatmap_is_the_reports_gradient_flow(tmp_path):
    """The notebook's small heatmap is the report's gradient-flow spec, pixel for pixel (each
    cell scaled up), and a loaded run still shows it after its directory moved away."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from gradscope import notebook
    from gradscope.report import figures
    from gradscope.report.data import read_report_data
    from gradscope.report.specs import heatmap_spec

    model = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, out=tmp_path, quiet=True) as scope:
        for _ in range(30):
            opt.zero_grad()
            model(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step()
    data = read_report_data(scope.run_dir, max_cols=notebook.HEAT_COLS)
    uri, first, last = notebook.heatmap_png(data)
    assert (first, last) == ("0.weight", "4.bias")
    spec = heatmap_spec(data, "grad_norm").plot
    expected = np.round(
        figures.colorize(spec.values, spec.bad, spec.cmap, *spec.value_range()) * 255
    ).astype(np.uint8)
    img = np.asarray(Image.open(io.BytesIO(notebook.png_bytes(uri))).convert("RGB"))
    rows, cols = expected.shape[:2]
    assert img.shape[0] % rows == 0 and img.shape[1] % cols == 0
    sy, sx = img.shape[0] // rows, img.shape[1] // cols
    assert sy >= 2 and (img[::sy, ::sx] == expected).all()

    run_ = scope.load()
    shutil.move(str(scope.run_dir), str(tmp_path / "moved"))
    page = parse(run_._repr_html_())
    assert page.imgs[0] == uri


@pytest.mark.parametrize("where", ["taken", "written"])
def test_stop_during_a_flush_waits_for_it(tmp_path, monkeypatch, where):
    """Ctrl-C (the stop button: SIGINT) that lands inside a flush is delivered when the flush
    has ended: the KeyboardInterrupt reaches the loop with the flush's chunk written and
    diagnosed; the records stay whole (each step once) and the run goes on."""
    import os
    import signal

    from gradscope import flusher

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, out=tmp_path, flush_every=10, quiet=True)
    f = scope._flusher
    target = (flusher.LongTable, "from_chunk") if where == "taken" else (f, "_write_pending")
    orig = getattr(*target)
    seen = []

    def interrupted(*args, **kwargs):
        if not seen:
            seen.append(f.flushes)
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*args, **kwargs)

    monkeypatch.setattr(*target, interrupted)

    def step():
        opt.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        opt.step()

    done = 0
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(30):
                step()
                done += 1
        assert seen == [0] and f.flushes == 1  # delivered after the flush, not inside it
        assert len(list((scope.run_dir / "metrics").glob("*.parquet"))) == 1
        for _ in range(10):
            step()
    finally:
        scope.close()
    r = load_run(scope.run_dir)
    g = r.metrics[r.metrics["metric"] == "grad_norm"]
    assert not g.duplicated(["step", "layer"]).any()
    assert sorted(g["step"].unique()) == list(range(r.steps)) and r.steps == done + 1 + 10


def test_stop_during_close_leaves_the_run_whole(tmp_path, monkeypatch):
    """A Ctrl-C while the run closes (an impatient second press) waits until run.json,
    findings.json and report.html are written, then interrupts."""
    import os
    import signal

    from gradscope import scope as scope_module

    orig = scope_module.write_report_safely

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return orig(*args, **kwargs)

    monkeypatch.setattr(scope_module, "write_report_safely", interrupted)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(KeyboardInterrupt),
        gradscope.watch(model, out=tmp_path, quiet=True) as scope,
    ):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
    assert scope.closed
    r = load_run(scope.run_dir)
    assert r.state == "completed" and r.steps == 5 and not r.problems
    assert (scope.run_dir / "report.html").is_file()


def test_held_interrupt_runs_the_handler_in_place_afterwards():
    import os
    import signal
    import threading

    from gradscope.interrupts import held

    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes: give it some
                pass
            assert calls == []
        assert calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not None
        # outside the main thread: nothing to hold (signals go to the main thread)
        seen = []
        t = threading.Thread(target=lambda: seen.append(held().__enter__() is None))
        t.start()
        t.join()
        assert seen == [True]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_nested_with_blocks_are_left_alone_handles_are_not(tmp_path):
    """``watch()`` inside the ``with`` block of a scope on the same model nests on purpose:
    both stay open. A handle left open (no ``with``) is replaced, in a script too."""
    model = nn.Linear(3, 3)
    with gradscope.watch(model, out=tmp_path, quiet=True) as outer:
        inner = gradscope.watch(model, out=tmp_path, quiet=True)
        assert not outer.closed and not inner.closed
        again = gradscope.watch(model, out=tmp_path, quiet=True)
        assert inner.closed and not outer.closed and not again.closed
        again.close()
    assert outer.closed
    assert [e["event"] for e in load_run(inner.run_dir).events][-1] == "superseded"


def test_a_failing_display_costs_the_view_not_the_run(kernel, capsys):
    """The front end's display fails: one internal-error line, the terminal's finding lines
    and summary come back, and the records, findings and report are all there."""

    def broken(*args, **kwargs):
        raise RuntimeError("display channel closed")

    kernel.display_pub.publish = broken
    run(kernel, SETUP)
    run(
        kernel,
        "with gradscope.watch(model, out=OUT, flush_every=10) as scope:\n"
        "    for i in range(30):\n"
        "        if i == 12: x[0, 0] = float('nan')\n"
        "        one_step()\n"
        "        x[0, 0] = 1.0",
    )
    err = capsys.readouterr().err
    assert err.count("internal error") == 1 and "display channel closed" in err
    assert "gradscope: error" in err and "finding(s)" in err  # the terminal's lines
    scope = kernel.user_ns["scope"]
    r = load_run(scope.run_dir)
    assert r.state == "completed" and r.steps == 30 and r.findings
    assert (scope.run_dir / "report.html").is_file()


def test_worst_layers_by_hand():
    """The live view's "layers to look at", from a table built by hand: a NaN gradient
    first, then layers by how many decades they lie from the median, then dead units; a layer
    within a decade of the median is not listed; each column's last value counts."""
    import numpy as np

    from gradscope.notebook import worst_layers
    from gradscope.records import LongTable

    columns = [
        ("a.weight", "param", "grad_norm"),
        ("b.weight", "param", "grad_norm"),
        ("c.weight", "param", "grad_norm"),
        ("d.weight", "param", "grad_norm"),
        ("e.weight", "param", "grad_norm"),
        ("relu", "module", "act_dead_fraction"),
    ]
    # step 0: everything ordinary; step 1 (the last): a 1,000x, b NaN, c 1/100x, relu 60% dead
    step = np.array([0] * 6 + [1] * 6)
    col = np.array(list(range(6)) * 2)
    value = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1000.0, np.nan, 0.01, 1.0, 2.0, 0.6])
    rows = worst_layers(LongTable(step, col, value, columns))
    assert [(r[0], r[1]) for r in rows] == [
        ("<code>b.weight</code>", "gradient norm"),
        ("<code>a.weight</code>", "gradient norm"),
        ("<code>c.weight</code>", "gradient norm"),
        ("<code>relu</code>", "dead units"),
    ]
    # the median of the finite norms: (1 + 2) / 2
    assert rows[1][2] == "1e+03 (6.7e+02× the median layer's)"
    assert rows[2][2] == "0.01 (0.0067× the median layer's)"
    assert rows[3][2] == "60%"


def test_a_cell_that_did_not_train_has_no_say(shell):
    """A hand-written SGD loop (no optimizer: steps end at the next backward pass, so a step
    is always open between cells): a later cell that raises without training it changes
    nothing, no event, no status."""
    run(shell, SETUP)
    run(shell, "scope = gradscope.watch(model, out=OUT)")
    run(
        shell,
        "for i in range(6):\n"
        "    model.zero_grad()\n"
        "    nn.functional.mse_loss(model(x), y).backward()\n"
        "    with torch.no_grad():\n"
        "        for p in model.parameters():\n"
        "            p -= 0.01 * p.grad",
    )
    scope = shell.user_ns["scope"]
    assert scope._outcome == "completed"
    assert isinstance(run(shell, "raise KeyboardInterrupt"), KeyboardInterrupt)
    assert scope._outcome == "completed" and scope._note == ""
    run(shell, "scope.close()")
    r = load_run(scope.run_dir)
    assert r.state == "completed" and r.steps == 6
    assert not [e for e in r.events if e["event"].startswith("cell_")]


def test_a_replaced_run_keeps_its_summary_in_its_own_area(kernel):
    """A live scope replaced by running its watch() cell again: its summary updates its own
    display area (in the earlier cell); the cell that replaced it gets no area of the old
    run's."""
    run(kernel, SETUP)
    cell = "scope = gradscope.watch(model, out=OUT, flush_every=5)"
    run(kernel, cell)
    run(kernel, "for i in range(12):\n    one_step()")
    old = kernel.user_ns["scope"]
    shown = len(kernel.display_pub.outputs)
    area = kernel.display_pub.outputs[-1]["transient"]["display_id"]
    run(kernel, cell)
    assert old.closed
    later = kernel.display_pub.outputs[shown:]
    assert later and all(o["update"] and o["transient"]["display_id"] == area for o in later)
    assert old.run_dir.name in later[-1]["data"]["text/html"]
    run(kernel, "scope.close()")


def test_text_from_the_run_is_escaped():
    """Names and messages from the run are text in the notebook's HTML, never markup."""
    from gradscope.notebook import plain_text, summary_html

    bad = "<img src=x onerror=alert(1)>"
    finding = {
        "kind": "dead_units",
        "layer": bad,
        "layers": [bad, "<script>x</script>"],
        "severity": "error",
        "first_step": 3,
        "last_step": 9,
        "message": "<b>bold</b>",
        "suggestion": "</td><script>alert(2)</script>",
    }
    markup = summary_html(
        name=bad, state="completed", steps=10, findings=[finding], path=bad, data=None
    )
    assert "<img src=x" not in markup and "<script" not in markup and "<b>bold" not in markup
    assert "&lt;img src=x onerror=alert(1)&gt;" in markup
    page = parse(markup)
    assert page.imgs == []
    assert "<script>alert(2)</script>" in "".join(page.text)  # shown as text
    assert bad in plain_text(bad, "completed", 10, [finding])
