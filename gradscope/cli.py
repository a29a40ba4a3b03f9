"""The ``gradscope`` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """Find and treat gradient pathologies in PyTorch training."""


def remedy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The remedy options, the same strings as ``watch(clip=..., guard=..., swap=...,
    recycle=...)``; checked by :class:`gradscope.Config` (a bad one is a one-line usage
    error)."""
    fn = click.option("--recycle", is_flag=True, default=False,
                      help="Re-initialise dead units (ReDo) when dead_units is found.")(fn)
    fn = click.option("--swap", metavar="SPEC", default=None,
                      help="Swap activations on a finding, e.g. 'relu->leaky_relu:0.2'.")(fn)
    fn = click.option("--guard", metavar="N", default=None,
                      help="Skip steps with NaN/Inf gradients; stop after N in a row "
                           "('true' = 10).")(fn)
    fn = click.option("--clip", metavar="SPEC", default=None,
                      help="Clip gradients: 'norm:1.0', 'autoclip', 'agc:0.01', 'zclip'.")(fn)
    return fn


def remedy_config(clip: str | None, guard: str | None, swap: str | None,
                  recycle: bool) -> dict[str, Any]:
    """The remedy options as ``watch`` keywords, validated now (a usage error, not a
    traceback)."""
    from .config import Config

    opts: dict[str, Any] = {"clip": clip, "guard": guard if guard is not None else False,
                            "swap": swap, "recycle": recycle}
    try:
        Config(**opts)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    return opts


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Output root for the run directory.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps.")
@remedy_options
def demo(out: Path, steps: int, clip: str | None, guard: str | None, swap: str | None,
         recycle: bool) -> None:
    """Train a small deep-sigmoid network under gradscope and summarise the run."""
    from . import demo as demo_mod
    from .load import load_run
    from .sinks.console import print_summary

    remedies = remedy_config(clip, guard, swap, recycle)
    try:
        run_dir = demo_mod.run(out=out, steps=steps, **remedies)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    print_summary(load_run(run_dir))
    click.echo(f"\nrun directory: {run_dir}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
def summary(run: Path) -> None:
    """Print a per-layer summary of the run directory RUN."""
    from .load import load_run
    from .sinks.console import print_summary

    try:
        loaded = load_run(run)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    print_summary(loaded)


if __name__ == "__main__":  # pragma: no cover
    main()
