"""The ``gradscope`` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_options import (
    GUARD_HELP,
    _guard_spelling,
    build_config,
    config_options,
    guard_option,
    remedy_config,
    remedy_options,
)
from .cli_view import link_runs, spec_safe, unlink_runs, view

# the options live in cli_options.py and `view` in cli_view.py; their names stay importable here
__all__ = [
    "GUARD_HELP",
    "build_config",
    "compare",
    "config_options",
    "demo",
    "entry",
    "guard_option",
    "link_runs",
    "main",
    "remedy_config",
    "remedy_options",
    "report",
    "run",
    "spec_safe",
    "summary",
    "unlink_runs",
    "view",
    "without_nproc",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """Find and treat gradient pathologies in PyTorch training."""


main.add_command(view)


class _RunCommand(click.Command):
    """``run``'s parsing: gradscope's options end at the script (or at ``-m MODULE``, or at
    ``--``); everything after belongs to the script, even what looks like gradscope's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            name
            for p in self.params
            if isinstance(p, click.Option) and not p.is_flag
            for name in p.opts
        }
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--guard" or arg.startswith("--guard="):
                options, used = _guard_spelling(args, i, ctx)
                out += options
                i += used
                continue
            if arg.startswith("-m") and len(arg) > 2:  # python's -mpackage.module
                out += ["-m", arg[2:], *args[i + 1 :]]
                break
            if arg in ("--", "-m") or not arg.startswith("-") or arg == "-":
                out += args[i:]
                break
            out.append(arg)
            if arg in takes_value and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            i += 1
        ctx.meta["gradscope.argv"] = list(args)  # for --nproc-per-node: the workers' command
        return super().parse_args(ctx, out)


@main.command(
    cls=_RunCommand,
    context_settings={"allow_interspersed_args": False},
    short_help="Run a script (or -m module) exactly as python would, watched.",
)
@click.option(
    "-m",
    "as_module",
    is_flag=True,
    help="Run a module, as python -m does (SCRIPT is the module name).",
)
@click.option(
    "--nproc-per-node",
    "nproc",
    metavar="N",
    help="Start N processes with torch.distributed.run (torchrun --standalone), each "
    "running the script under gradscope; rank 0 writes the run directory. "
    "For several nodes: torchrun ... -m gradscope run SCRIPT.",
)
@config_options
@click.argument("script", metavar="SCRIPT | -m MODULE")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(
    script: str, args: tuple[str, ...], as_module: bool, nproc: str | None, **options: Any
) -> Any:
    """Run SCRIPT with ARGS as `python SCRIPT ARGS...` would, with gradscope attached.

    \b
      gradscope run train.py --lr 3e-4
      gradscope run --clip autoclip -m mypackage.train --epochs 3

    The options before SCRIPT are gradscope's; everything after it is the script's. Models
    are found at their first training forward pass and optimizers at their first step; the
    run directory is written however the script ends, and the exit code is the script's.
    """
    from . import runner

    if (
        nproc is not None
        and not (nproc.isdigit() and int(nproc) > 0)
        and nproc not in ("auto", "cpu", "gpu")
    ):
        raise click.UsageError(
            f"--nproc-per-node {nproc!r}: expected a positive number of "
            "processes, or auto, cpu or gpu (as torchrun accepts)"
        )
    config = build_config({**options})
    try:
        target = runner.resolve_module(script) if as_module else runner.resolve_script(script)
    except runner.TargetError as exc:
        raise click.UsageError(str(exc)) from None
    _check_out(config.out)
    # the script may chdir: a relative output root means the one gradscope run started in
    config = config.replace(out=config.out.resolve())
    if nproc is not None:
        raw = click.get_current_context().meta["gradscope.argv"]
        return runner.launch_workers(nproc, without_nproc(raw))
    return runner.run(target, list(args), config)


def without_nproc(argv: list[str]) -> list[str]:
    """``run``'s arguments for each worker: the same, less ``--nproc-per-node N`` (which can
    only stand among gradscope's options, before SCRIPT). The workers start in this working
    directory, so a relative ``--out`` means the same root to every one."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc-per-node":
            i += 2
            continue
        if arg.startswith("--nproc-per-node="):
            i += 1
            continue
        if arg in ("--", "-m") or not arg.startswith("-"):
            out += argv[i:]
            break
        out.append(arg)
        i += 1
    return out


def _check_out(out: Path) -> None:
    """Fail before the script runs if the output root cannot be written."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(
            f"--out {str(out)!r}: cannot create the output root ({exc.strerror or exc})"
        ) from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise click.UsageError(f"--out {str(out)!r}: not a writable directory")


def entry(argv: list[str] | None = None) -> int:
    """The ``gradscope`` console script. Usage errors are one line on stderr (exit 2); after
    ``run``, the script's own ending (its exit code, or its exception re-raised for Python to
    print) happens here, outside click."""
    import sys

    given = sys.argv[1:] if argv is None else argv
    if not given:  # `gradscope` alone: its help on stderr, exit 2 (as click >= 8.2 does)
        with click.Context(main, info_name="gradscope") as ctx:
            print(main.get_help(ctx), file=sys.stderr)
        return 2
    try:
        result = main.main(args=argv, prog_name="gradscope", standalone_mode=False)
    except click.UsageError as exc:
        if exc.ctx is not None:
            where = exc.ctx.command_path
        else:  # raised while parsing, before a context existed: name the subcommand anyway
            sub = given[0] if given and given[0] in main.commands else None
            where = f"gradscope {sub}" if sub else "gradscope"
        print(f"{where}: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    runner = sys.modules.get("gradscope.runner")  # imported by `run`, not before (it is slower)
    if runner is not None and isinstance(result, runner.Outcome):
        return int(runner.finish(result))
    return 0


class _DemoCommand(click.Command):
    """``demo``'s parsing: the older ``--guard N`` spellings become ``--guard-limit N`` (as in
    ``run``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            if args[i] == "--":
                out += args[i:]
                break
            if args[i] == "--guard" or args[i].startswith("--guard="):
                options, used = _guard_spelling(args, i, ctx)
                out += options
                i += used
                continue
            out.append(args[i])
            i += 1
        return super().parse_args(ctx, out)


@main.command(cls=_DemoCommand)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Output root for the run directory.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Training steps."
)
@remedy_options
def demo(
    out: Path,
    steps: int,
    clip: str | None,
    guard: bool | None,
    guard_limit: int | None,
    swap: str | None,
    recycle: bool,
) -> None:
    """Train a small deep-sigmoid network under gradscope and summarise the run."""
    remedies = remedy_config(clip, guard, guard_limit, swap, recycle)
    _check_out(out)
    from . import demo as demo_mod
    from .load import load_run
    from .sinks.console import print_summary

    try:
        run_dir = demo_mod.run(out=out, steps=steps, **remedies)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    print_summary(load_run(run_dir))
    click.echo(f"\nrun directory: {run_dir}")
    report = run_dir / "report.html"
    if report.is_file():
        click.echo(f"report: {report} (open it in a browser)")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it  [default: RUN/report.html].",
)
def report(run: Path, output: Path | None) -> None:
    """Write the HTML report of the run directory RUN (one self-contained file).

    A run that crashed or was killed gets a partial report that says what is missing.
    """
    from .report import write_report

    _write_page(write_report, run, output)


@main.command()
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it  [default: compare-A-vs-B.html here].",
)
def compare(run_a: Path, run_b: Path, output: Path | None) -> None:
    """Write one HTML page that overlays RUN_A and RUN_B (before and after a fix)."""
    from .report import write_compare

    if output is None:
        output = Path(f"compare-{run_a.resolve().name}-vs-{run_b.resolve().name}.html")
    _write_page(write_compare, run_a, run_b, output)


def _write_page(write: Callable[..., Path], *args: Any) -> None:
    """Write an HTML page and print where; a missing run or an unwritable file is a one-line
    usage error."""
    try:
        path = write(*args)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.UsageError(f"cannot write {args[-1]}: {exc.strerror or exc}") from None
    import stat

    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        regular = False
    # where the page went; a stream (-o /dev/stdout, a pipe) got the page itself
    click.echo(str(path), err=not regular)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=25,
    show_default=True,
    help="Show only the N layers that most need a look (0: all).",
)
def summary(run: Path, top: int) -> None:
    """Print the findings and a per-layer table of the run directory RUN."""
    from .load import load_run
    from .sinks.console import print_summary

    try:
        loaded = load_run(run)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    print_summary(loaded, top=top)


if __name__ == "__main__":  # pragma: no cover
    main()
