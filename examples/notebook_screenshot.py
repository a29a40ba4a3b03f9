"""Remake ``reports/gallery/notebook.png``: run ``examples/notebook.ipynb`` on a Jupyter kernel,
export the executed notebook to HTML as ``jupyter nbconvert --to html`` does, and photograph
that page with headless Chromium (what a reader of the notebook sees).

    python examples/notebook_screenshot.py [--out reports/gallery/notebook.png] [--keep DIR]

Needs, beyond the test extra (nbclient, ipykernel): nbconvert (``pip install nbconvert``; the
committed picture was made with 7.17.2) and Chromium (Debian's ``chromium`` package). The
notebook runs in a temporary directory, so its runs do not land in ``reports/``; ``--keep``
keeps that directory (the executed notebook, its HTML and the runs).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"
WIDTH = 1100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gallery" / "notebook.png")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work directory here")
    args = parser.parse_args()
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        raise SystemExit("no Chromium found (chromium, chromium-browser, google-chrome)")
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    work = Path(tempfile.mkdtemp(prefix="gradscope-notebook-"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}}
    ).execute()
    nbformat.write(nb, work / "notebook.ipynb")
    page, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    html = work / "notebook.html"
    html.write_text(page, encoding="utf-8")
    shot = work / "full.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={WIDTH},6000",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _trim(shot, args.out)
    print(f"wrote {args.out}")
    if args.keep is not None:
        shutil.copytree(work, args.keep, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def _trim(src: Path, dst: Path) -> None:
    """The page without the blank window below it."""
    import numpy as np
    from PIL import Image

    img = Image.open(src).convert("RGB")
    px = np.asarray(img)
    ink = np.flatnonzero((px < 250).any(axis=(1, 2)))
    bottom = int(ink[-1]) + 24 if len(ink) else img.height
    img.crop((0, 0, img.width, min(bottom, img.height))).save(dst, optimize=True)


if __name__ == "__main__":
    main()
