"""The ``gradscope`` command line."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """Find and treat gradient pathologies in PyTorch training."""


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Output root for the run directory.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps.")
def demo(out: Path, steps: int) -> None:
    """Train a small deep-sigmoid network under gradscope and summarise the run."""
    from . import demo as demo_mod
    from .load import load_run
    from .sinks.console import print_summary

    try:
        run_dir = demo_mod.run(out=out, steps=steps)
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
