"""``gradscope view``: TensorBoard on run directories, each shown under its own name."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument(
    "runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=6006,
    show_default=True,
    help="Port to serve on (0: any free port).",
)
@click.option("--host", default="localhost", show_default=True, help="Address to bind.")
def view(runs: tuple[Path, ...], port: int, host: str) -> None:
    """Start TensorBoard on the run directories RUNS (their tb/ folders), print its address,
    and serve until Ctrl-C."""
    import signal
    import sys
    import time

    from . import rundir

    boards: dict[str, Path] = {}
    for run in runs:
        tb = run / rundir.TB
        if not tb.is_dir():
            raise click.UsageError(
                f"{run}: no {rundir.TB}/ folder (a run with "
                "tensorboard=False, or not a gradscope run directory)"
            )
        name = run.resolve().name
        while name.lower() in {n.lower() for n in boards}:  # case-insensitive file systems
            name += "_"
        boards[name] = tb.resolve()
    from tensorboard import program

    logdir, links = link_runs(boards)
    try:
        # TensorBoard names each run by its folder below --logdir: the run directory's name,
        # whatever it holds (--logdir_spec would split names and paths on ',' and ':')
        where = (
            ["--logdir", str(logdir)]
            if logdir is not None
            else ["--logdir_spec", ",".join(f"{spec_safe(n)}:{tb}" for n, tb in boards.items())]
        )
        board = program.TensorBoard()
        board.configure(argv=[None, *where, "--port", str(port), "--host", host])
        try:
            url = board.launch()
        except Exception as exc:  # a taken port, a bad host
            raise click.UsageError(f"TensorBoard could not start: {exc}") from None
        click.echo(f"TensorBoard on {url} (Ctrl-C to stop); custom scalars: {url}#custom_scalars")
        sys.stdout.flush()

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        previous = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread: no handler
                    previous[sig] = signal.signal(sig, stop)  # a kill removes the links too
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("stopped")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        unlink_runs(logdir, links)


def link_runs(boards: dict[str, Path]) -> tuple[Path | None, list[Path]]:
    """A temporary folder with one symbolic link per run, named as the run: TensorBoard's
    ``--logdir``. ``(None, [])`` where links cannot be made (Windows without the privilege, no
    writable temporary folder): then ``--logdir_spec``, with the names made safe for it."""
    import tempfile

    links: list[Path] = []
    try:
        logdir = Path(tempfile.mkdtemp(prefix="gradscope-view-"))
    except OSError:  # no writable temporary folder
        return None, []
    try:
        for name, tb in boards.items():
            link = logdir / name
            link.symlink_to(tb, target_is_directory=True)
            links.append(link)
    except OSError:
        unlink_runs(logdir, links)
        return None, []
    return logdir, links


def unlink_runs(logdir: Path | None, links: list[Path]) -> None:
    """Remove what :func:`link_runs` made: the links alone (never what they point to), then
    the folder."""
    for link in links:
        with contextlib.suppress(OSError):
            link.unlink()
    if logdir is not None:
        with contextlib.suppress(OSError):
            logdir.rmdir()


def spec_safe(name: str) -> str:
    """A run name TensorBoard's ``--logdir_spec`` keeps whole (it splits on ',' and ':')."""
    return name.replace(",", "_").replace(":", "_")
