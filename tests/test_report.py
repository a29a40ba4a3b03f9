"""The HTML report: written at the end of every run, one self-contained file, its text escaped,
its numbers equal to the records, and a partial report (never a traceback) from a broken run."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.report import write_report
from gradscope.report.data import read_report_data, run_series

from models import mostly_dead_linear

# the report's structure (golden): section ids in order, for a run with parameters,
# activations and a loss (saturation appears only with sigmoid/tanh units)
SECTIONS = [
    "findings",
    "gradient-flow",
    "grad-norms",
    "grad-bars",
    "grad-total",
    "update-ratios",
    "dead-units",
    "loss",
    "remedies",
]


class Page(HTMLParser):
    """Every tag, attribute and text of a page, for the checks below."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.style = ""
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        else:
            self.text.append(data)

    def ids(self, tag: str) -> list[str]:
        return [a["id"] for t, a in self.tags if t == tag and a.get("id")]

    def data_uris(self) -> list[str]:
        return [a["href"] for t, a in self.tags if t == "image"]


def _train(model, steps, out, nan_at=None, scale=1.0, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    with gradscope.watch(model, out=out, quiet=True, **options) as scope:
        for step in range(steps):
            x = torch.randn(32, model[0].in_features, generator=gen) * scale
            if step == nan_at:
                x[0, 0] = float("nan")
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    return scope.run_dir


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


def test_every_run_ends_with_a_self_contained_report(out):
    run_dir = _train(mostly_dead_linear(), 30, out, activation_every=1)
    path = run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.ids("header") == ["header"] and page.ids("section") == SECTIONS
    # nothing external: no script, no stylesheet link, every image inline, no remote URL
    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "img"}
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in ("src", "href", "action", "xlink:href"):
                assert value is not None and value.startswith("data:image/png;base64,"), (
                    tag,
                    name,
                    value,
                )
            if name.startswith("on"):
                pytest.fail(f"event handler {name} on <{tag}>")
    assert "url(" not in page.style and "@import" not in page.style
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    # every inline image decodes as a PNG
    from matplotlib import image as mpimg

    uris = page.data_uris()
    assert len(uris) >= 4
    for uri in uris:
        img = mpimg.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")
        assert img.ndim == 3 and img.shape[0] > 0
    body = " ".join(page.text)
    assert "dead_units" in body and "Findings (1)" in body and "completed" in body


def test_a_hostile_layer_name_is_shown_as_text(out):
    evil = "<img src=x onerror=alert(1)>"
    model = nn.Sequential(nn.Linear(4, 8), nn.ModuleDict({evil: nn.ReLU()}))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.ModuleDict({evil: nn.Linear(4, 4), "act": nn.ReLU()})

        def forward(self, x):
            return self.body["act"](self.body[evil](x))

    del model
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradscope.watch(net, out=out, quiet=True, activation_every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4)).sum().backward()
            opt.step()
    text = (scope.run_dir / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert not any(t == "img" for t, _ in page.tags)
    assert not any(name.startswith("on") for _, a in page.tags for name in a)
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert any(evil in t for t in page.text)  # the name is there, as text


def test_the_figures_numbers_are_the_records(out):
    run_dir = _train(_mlp(), 50, out, nan_at=None)
    data = read_report_data(run_dir, max_cols=7)  # 50 steps in 7 bins of 8
    assert (data.width, data.cols, data.last_step) == (8, 7, 49)
    run = gradscope.load_run(run_dir)
    g = run.metrics.query("metric == 'grad_norm'")
    names, idx = data.ordered("grad_norm")
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    logmean = data.acc["grad_norm"].log_mean()[idx]
    for r, name in enumerate(names):
        rows = g[g["layer"] == name]
        for b in range(data.cols):
            vals = rows[(rows["step"] // 8) == b]["value"].to_numpy()
            assert logmean[r, b] == pytest.approx(np.log10(vals).mean(), rel=1e-9)
    mean, peak = data.acc["grad_norm"].whole_run()
    by_layer = g.groupby("layer")["value"]
    assert mean[idx] == pytest.approx(by_layer.mean()[names].to_numpy(), rel=1e-9)
    assert peak[idx] == pytest.approx(by_layer.max()[names].to_numpy(), rel=1e-12)
    loss = run.metrics.query("metric == 'loss'").sort_values("step")["value"].to_numpy()
    x, y, _, _ = run_series(data, "loss")
    assert list(x) == list(range(0, 50, 8))
    assert y == pytest.approx([loss[i : i + 8].mean() for i in range(0, 50, 8)], rel=1e-9)


def test_a_nan_step_marks_its_bin(out):
    run_dir = _train(_mlp(), 40, out, nan_at=17)
    data = read_report_data(run_dir, max_cols=10)  # bins of 4: step 17 is in bin 4
    _, idx = data.ordered("grad_norm")
    bad = data.acc["grad_norm"].nonfinite()[idx]
    assert bad[:, 4].all()  # every gradient is NaN from step 17 on (NaN weights)
    assert not bad[:, :4].any()
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    assert "NaN/Inf" in " ".join(page.text) + (run_dir / "report.html").read_text()


@pytest.mark.parametrize(
    "damage", ["no run.json", "corrupt chunk", "truncated events", "no findings", "no metrics"]
)
def test_a_broken_run_directory_gives_a_partial_report(out, damage):
    run_dir = _train(_mlp(), 250, out, flush_every=100)  # 3 chunks
    chunks = sorted((run_dir / "metrics").glob("part-*.parquet"))
    assert len(chunks) == 3
    (run_dir / "report.html").unlink()
    expect = {
        "no run.json": "run.json missing",
        "corrupt chunk": "part-000002.parquet unreadable",
        "truncated events": "events.jsonl line",
        "no findings": None,
        "no metrics": "no metrics recorded",
    }[damage]
    if damage == "no run.json":
        (run_dir / "run.json").unlink()
    elif damage == "corrupt chunk":
        chunks[1].write_bytes(b"PAR1 this is not parquet")
    elif damage == "truncated events":
        with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write('{"event": "finding", "kind": "dead_un')
    elif damage == "no findings":
        (run_dir / "findings.json").unlink()
    else:
        shutil.rmtree(run_dir / "metrics")
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run_dir / "report.html") and proc.stderr == ""
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    body = " ".join(page.text)
    if expect is None:
        assert "problems" not in page.ids("div")
    else:
        assert "This report is partial." in body and expect in body, body[:2000]


def test_report_command_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        proc = subprocess.run(
            [sys.executable, "-m", "gradscope", "report", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_report_off_and_written_later(out, tmp_path):
    run_dir = _train(_mlp(), 5, out, report=False)
    assert not (run_dir / "report.html").exists()
    target = write_report(run_dir, tmp_path / "elsewhere.html")
    assert target == tmp_path / "elsewhere.html" and target.stat().st_size > 1000


def test_a_report_that_cannot_be_written_costs_the_report_not_the_run(out, monkeypatch, capfd):
    import gradscope.report.html as html_mod

    def boom(data):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(html_mod, "render", boom)
    model = _mlp()
    with gradscope.watch(model, out=out) as scope:
        model(torch.randn(4, 8)).sum().backward()
    run = gradscope.load_run(scope.run_dir)
    assert run.meta["status"] == "completed" and not (scope.run_dir / "report.html").exists()
    assert any(e.get("where") == "report" for e in run.events)
    assert "report.html not written" in capfd.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium on this machine (.ci/run installs "
    "Debian's chromium package; the report's structure is checked above)",
)
def test_the_report_renders_in_headless_chromium(out, tmp_path):
    run_dir = _train(mostly_dead_linear(), 30, out, activation_every=1)
    report = run_dir / "report.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), *flags, "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console = [
        ln
        for ln in proc.stderr.splitlines()
        if "CONSOLE" in ln or "Failed to load" in ln or "net::ERR" in ln
    ]
    assert console == [], console
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    page = Page(dom)
    assert page.ids("section") == SECTIONS
    assert len(page.data_uris()) >= 4
    from matplotlib import image as mpimg

    img = mpimg.imread(shot)
    assert img.std() > 0.05  # not a blank page


def test_the_report_of_a_gradscope_run_without_a_model(tmp_path):
    script = tmp_path / "nothing.py"
    script.write_text("print('no training here')\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradscope",
            "run",
            "--quiet",
            "--out",
            str(tmp_path / "runs"),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = list((tmp_path / "runs").iterdir())
    body = " ".join(Page((run_dir / "report.html").read_text()).text)
    assert "no model trained" in body and "No gradient norms recorded." in body


def test_compare_overlays_two_runs(out, tmp_path):
    from gradscope.report import write_compare

    before = _train(mostly_dead_linear(), 20, out / "a", activation_every=1)
    after = _train(_mlp(), 30, out / "b")
    path = write_compare(before, after, tmp_path / "cmp.html")
    page = Page(path.read_text(encoding="utf-8"))
    assert page.ids("section") == [
        "findings",
        "loss",
        "grad-total",
        "grad-bars",
        "update-bars",
        "dead-bars",
    ]
    body = " ".join(page.text)
    assert "1 in A, 0 in B" in body and "dead_units" in body
    assert not {t for t, _ in page.tags} & {"script", "link", "img", "iframe"}
    # the CLI, with its default output name, and a missing run as a one-line error
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "compare", str(before), str(after)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / proc.stdout.strip()).is_file()
    assert proc.stdout.strip() == f"compare-{before.name}-vs-{after.name}.html"
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", "compare", str(before), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_saturation_and_the_remedy_timeline(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(50.0)  # tanh pinned at +-1
    run_dir = _train(model, 30, out, nan_at=12, guard=True, activation_every=1)
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    assert "saturation" in page.ids("section")
    body = " ".join(page.text)
    assert "Remedy timeline (1)" in body and "skip_step" in body
    # the skipped step is a dashed marker on the step charts
    markers = [a for t, a in page.tags if t == "line" and a.get("stroke-dasharray")]
    assert markers, "no remedy marker drawn"


# -- NaN never reads as 0 -----------------------------------------------------------------------
NAN_FROM, NAN_STEPS = 20, 40


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A saturated tanh network whose first weights turn NaN at step 20 of 40: from then on the
    loss, every gradient and the tanh's output are NaN (and its saturation fraction, computed
    on NaN outputs, is recorded as 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("nan")
    with gradscope.watch(
        model, out=out, name="nan", quiet=True, activation_every=1, flush_every=8
    ) as scope:
        for step in range(NAN_STEPS):
            if step == NAN_FROM:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))
            opt.zero_grad()
            model(torch.randn(32, 8, generator=gen)).pow(2).mean().backward()
            opt.step()
    return scope.run_dir


def _sections(text: str) -> dict[str, list[tuple[str, dict]]]:
    """The tags of each <section>, by its id."""
    out: dict[str, list[tuple[str, dict]]] = {}
    current = None
    for tag, attrs in Page(text).tags:
        if tag == "section":
            current = out.setdefault(attrs.get("id"), [])
        elif current is not None:
            current.append((tag, attrs))
    return out


def _png(uri: str) -> np.ndarray:
    from matplotlib import image as mpimg

    return mpimg.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")


def test_nan_losses_get_the_magenta_ticks_the_caption_promises(nan_run):
    run = gradscope.load_run(nan_run)
    loss = run.wide("loss")["(run)"]
    assert np.isfinite(loss[:NAN_FROM]).all() and np.isnan(loss[NAN_FROM:]).all()
    data = read_report_data(nan_run)
    assert data.width == 1
    x, y, bad, _ = run_series(data, "loss")  # the all-NaN bins are there, marked
    assert list(x) == list(range(NAN_STEPS)) and list(bad) == [s >= NAN_FROM for s in x]
    assert np.isnan(y[NAN_FROM:]).all()
    text = (nan_run / "report.html").read_text(encoding="utf-8")
    sections = _sections(text)
    assert "magenta ticks: NaN/Inf loss" in " ".join(Page(text).text)
    ticks = [a for t, a in sections["loss"] if t == "line" and a.get("class") == "nonfinite"]
    assert len(ticks) == NAN_STEPS - NAN_FROM
    assert all(a["stroke"] == "rgb(217,0,140)" for a in ticks)
    # each tick stands at its step: x = 64 + 640 * step / 40
    assert [float(a["x1"]) for a in ticks] == pytest.approx(
        [64 + 640 * s / NAN_STEPS for s in range(NAN_FROM, NAN_STEPS)], abs=0.06
    )
    assert "NaN/Inf at step 20" in text and "NaN/Inf at step 39" in text
    # and the total gradient norm's chart the same
    ticks = [a for t, a in sections["grad-total"] if t == "line" and a.get("class") == "nonfinite"]
    assert len(ticks) == NAN_STEPS - NAN_FROM


def test_a_saturation_heatmap_after_nan_weights_is_magenta_not_0(nan_run):
    from gradscope.report.figures import BAD_RGB, colorize

    run = gradscope.load_run(nan_run)
    sat = run.wide("act_saturation")["1"]
    assert sat[NAN_FROM:].isna().all()  # what the probe records for NaN outputs
    assert (sat[:NAN_FROM] > 0.5).all()  # saturated before
    text = (nan_run / "report.html").read_text(encoding="utf-8")
    images = [a["href"] for t, a in _sections(text)["saturation"] if t == "image"]
    pixels = _png(images[0])[..., :3]  # rows: sites, columns: steps
    assert pixels.shape[1] == NAN_STEPS
    names, _ = read_report_data(nan_run).ordered("act_saturation")
    row = pixels[names.index("1")]
    assert np.allclose(row[NAN_FROM:], BAD_RGB, atol=2 / 255)
    zero = colorize(np.array([[0.0]]), None, "Oranges", 0.0, 1.0)[0, 0]
    assert not np.allclose(row[NAN_FROM:], zero, atol=0.05)
    assert not np.allclose(row[:NAN_FROM], BAD_RGB, atol=0.05)
    section_text = " ".join(Page(text).text)
    assert "NaN/Inf" in section_text and "its fraction means nothing there" in section_text
    # the gradient heatmap: magenta from step 20 on for the first layer's weight
    images = [a["href"] for t, a in _sections(text)["gradient-flow"] if t == "image"]
    grad = _png(images[0])[..., :3]
    names, _ = read_report_data(nan_run).ordered("grad_norm")
    assert np.allclose(grad[names.index("0.weight"), NAN_FROM:], BAD_RGB, atol=2 / 255)


def test_gradient_bars_mark_nan_layers_with_how_many(nan_run):
    text = (nan_run / "report.html").read_text(encoding="utf-8")
    marks = [
        a for t, a in _sections(text)["grad-bars"] if t == "rect" and a.get("class") == "nonfinite"
    ]
    assert len(marks) == 4  # every parameter: NaN gradients from step 20 on
    assert f"NaN/Inf ×{NAN_STEPS - NAN_FROM}" in " ".join(Page(text).text)


def test_compare_marks_nan_values_instead_of_empty_bars(nan_run, out, tmp_path):
    from gradscope.report import write_compare

    clean = _train(_mlp(), 10, out)
    page = write_compare(nan_run, clean, tmp_path / "cmp.html").read_text(encoding="utf-8")
    sections = _sections(page)
    # saturation, last sample: NaN output in A, so no bar and a mark (not a 0% bar)
    marks = [
        a for t, a in sections["saturation-bars"] if t == "rect" and a.get("class") == "nonfinite"
    ]
    assert len(marks) == 1
    titles = " ".join(Page(page).text)
    assert "A: NaN/Inf values (nan)" in titles
    marks = [a for t, a in sections["grad-bars"] if t == "rect" and a.get("class") == "nonfinite"]
    assert len(marks) == 4
    ticks = [a for t, a in sections["loss"] if t == "line" and a.get("class") == "nonfinite"]
    assert len(ticks) == NAN_STEPS - NAN_FROM


@pytest.mark.slow
@pytest.mark.parametrize("where", ["link", "fifo", "stdout"])
def test_report_output_goes_through_links_and_to_streams(out, tmp_path, where):
    run_dir = _train(_mlp(), 5, out, report=False)
    if where == "link":
        real = tmp_path / "site" / "report.html"
        real.parent.mkdir()
        real.write_text("old")
        link = tmp_path / "latest.html"
        link.symlink_to(real)
        proc = subprocess.run(
            [sys.executable, "-m", "gradscope", "report", str(run_dir), "-o", str(link)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert "gradscope report" in real.read_text()
        cmp = tmp_path / "cmp-link.html"
        cmp.symlink_to(real)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gradscope",
                "compare",
                str(run_dir),
                str(run_dir),
                "-o",
                str(cmp),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and cmp.is_symlink(), proc.stderr
        assert "gradscope: " in real.read_text() and " vs " in real.read_text()
    elif where == "fifo":
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradscope", "report", str(run_dir), "-o", str(fifo)],
            stdout=subprocess.PIPE,
            text=True,
        )
        with open(fifo, encoding="utf-8") as fh:
            html = fh.read()
        assert proc.wait(timeout=120) == 0
        proc.stdout.close()
        assert html.lstrip().startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
        assert fifo.is_fifo()
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "gradscope", "report", str(run_dir), "-o", "/dev/stdout"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.lstrip().startswith("<!DOCTYPE html>") and "</html>" in proc.stdout
        assert os.path.exists("/dev/stdout")
