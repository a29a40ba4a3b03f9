"""The ``gradscope`` command line."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """Find and treat gradient pathologies in PyTorch training."""


GUARD_HELP = ("Skip optimizer steps whose gradients hold NaN/Inf; stop after --guard-limit of "
              "them in a row. Older spellings, still accepted: --guard N (the limit; 0: off), "
              "--guard true/false (an integer or true/false right after --guard is its value).")


def remedy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The remedy options, the same strings as ``watch(clip=..., guard=..., swap=...,
    recycle=...)``; checked by :class:`gradscope.Config` (a bad one is a one-line usage
    error). ``--guard`` is a flag; the command's ``parse_args`` turns the older ``--guard N``
    spellings into ``--guard-limit N`` first (:func:`_guard_spelling`)."""
    fn = click.option("--recycle", is_flag=True, default=False,
                      help="Re-initialise dead units (ReDo) when dead_units is found.")(fn)
    fn = click.option("--swap", metavar="SPEC", default=None,
                      help="Swap activations on a finding, e.g. 'relu->leaky_relu:0.2'.")(fn)
    fn = click.option("--guard-limit", type=click.IntRange(min=1), metavar="N", default=None,
                      help="Skipped steps in a row before --guard stops the run (implies "
                           "--guard)  [default: 10].")(fn)
    fn = click.option("--guard/--no-guard", default=None, help=GUARD_HELP)(fn)
    fn = click.option("--clip", metavar="SPEC", default=None,
                      help="Clip gradients: 'norm:1.0', 'autoclip', 'agc:0.01', 'zclip'.")(fn)
    return fn


_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


def _is_integer(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isascii() and body.isdigit()


def _guard_spelling(args: list[str], i: int, ctx: click.Context) -> tuple[list[str], int]:
    """``args[i]`` is ``--guard`` or ``--guard=VALUE``: the options it stands for, and how many
    tokens it takes. ``--guard`` alone is the flag; an integer or true/false right after it (or
    after ``=``) is the older spelling of its value: ``N`` -> ``--guard-limit N``, ``0`` and
    false -> ``--no-guard``, true -> ``--guard``."""
    arg = args[i]
    if arg.startswith("--guard="):
        value, used = arg[len("--guard="):], 1
    elif i + 1 < len(args) and (args[i + 1].strip().lower() in _TRUE_WORDS + _FALSE_WORDS
                                or _is_integer(args[i + 1].strip())):
        value, used = args[i + 1], 2
    else:
        return ["--guard"], 1
    text = value.strip().lower()
    if text in _TRUE_WORDS:
        return ["--guard"], used
    if text in _FALSE_WORDS:
        return ["--no-guard"], used
    if _is_integer(text) and int(text) >= 0:
        return (["--guard-limit", str(int(text))] if int(text) else ["--no-guard"]), used
    raise click.UsageError(
        f"--guard {value!r}: expected no value (then --guard-limit N sets the limit), or "
        "the older spellings: an integer >= 0 (the limit; 0: off) or true/false", ctx)


def guard_option(guard: bool | None, limit: int | None) -> bool | int | None:
    """``watch(guard=...)`` from ``--guard/--no-guard`` and ``--guard-limit``; None: neither
    given."""
    if limit is not None:
        if guard is False:
            raise click.UsageError(f"--no-guard and --guard-limit {limit}: the limit is for "
                                   "the guard that --no-guard turns off; drop one")
        return limit
    return guard


def remedy_config(clip: str | None, guard: bool | None, guard_limit: int | None,
                  swap: str | None, recycle: bool) -> dict[str, Any]:
    """The remedy options as ``watch`` keywords, validated now (a usage error, not a
    traceback)."""
    from .config import Config

    guard_value = guard_option(guard, guard_limit)
    opts: dict[str, Any] = {"clip": clip, "guard": guard_value or False, "swap": swap,
                            "recycle": recycle}
    try:
        Config(**opts)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(_as_flag(str(exc), {"clip", "swap"})) from None
    return opts


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every :class:`gradscope.Config` field as an option (default None: not given, so a value
    from ``--config`` or ``[tool.gradscope]`` stands). Values are checked by Config."""
    opt = click.option
    decorators = [
        opt("--config", "config_file", metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Options from this TOML file ([tool.gradscope] or top-level keys) instead of "
                 "the working directory's pyproject.toml."),
        opt("--out", metavar="DIR", default=None, help="Output root  [default: reports]."),
        opt("--name", default=None,
            help="Run directory name, at most 240 bytes  [default: time-model]."),
        opt("--flush-every", type=int, metavar="N", help="Steps between host transfers."),
        opt("--flush-secs", type=float, metavar="SECS", help="Also flush after this long."),
        opt("--activation-every", type=int, metavar="N",
            help="Activation statistics every N steps."),
        opt("--update-every", type=int, metavar="N",
            help="Update ratios and weight norms every N steps."),
        opt("--include", multiple=True, metavar="GLOB", help="Watch only matching names."),
        opt("--exclude", multiple=True, metavar="GLOB", help="Do not watch matching names."),
        opt("--include-types", multiple=True, metavar="TYPE",
            help="Watch only these module types."),
        opt("--exclude-types", multiple=True, metavar="TYPE",
            help="Never watch these module types."),
        opt("--activation-types", multiple=True, metavar="TYPE",
            help="More module types to treat as activations."),
        opt("--dead-threshold", type=float, metavar="X",
            help="A unit is dead when its output is <= X."),
        opt("--sigmoid-saturation", type=float, metavar="X",
            help="A sigmoid output y is saturated when |y - 0.5| > X."),
        opt("--tanh-saturation", type=float, metavar="X",
            help="A tanh output y is saturated when |y| > X."),
        opt("--softmax-saturation", type=float, metavar="X",
            help="A softmax row is saturated when its max > X."),
        opt("--update-ratio/--no-update-ratio", default=None,
            help="Record ||dw||/||w|| (keeps a copy of the weights)."),
        opt("--backward-signal/--no-backward-signal", default=None,
            help="Record each module's output-gradient norm."),
        opt("--tensorboard/--no-tensorboard", default=None, help="Write TensorBoard logs."),
        opt("--tb-max-layers", type=int, metavar="N",
            help="Per-layer TensorBoard tags per metric: the N worst plus min/median/max "
                 "(0 = all)."),
        opt("--histograms/--no-histograms", default=None,
            help="TensorBoard histograms of each gradient every update_every steps."),
        opt("--step-on", type=click.Choice(["auto", "optimizer", "backward"]), default=None,
            help="What ends a step."),
        opt("--diagnose/--no-diagnose", default=None, help="Run the rules."),
        opt("--trace-nonfinite", type=click.Choice(["auto", "always", "off"]), default=None,
            help="Name the module that first produced a NaN/Inf."),
        opt("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
            help="Override a rule threshold, e.g. dead_fraction=0.6 (each has a range: "
                 "gradscope.rules.thresholds.Thresholds); the file's other thresholds stay."),
        opt("--quiet/--no-quiet", "-q", default=None,
            help="Print nothing (the run directory has everything)."),
        opt("--report/--no-report", default=None,
            help="Write report.html into the run directory at the end  [default: on]."),
    ]
    fn = remedy_options(fn)
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def build_config(options: dict[str, Any]) -> Any:
    """The run's Config: ``--config FILE`` (or the working directory's pyproject.toml), then
    the options given here on top. A bad value is a one-line usage error naming its source."""
    from .config import Config, file_options, project_options

    config_file = options.pop("config_file", None)
    guard = guard_option(options.pop("guard", None), options.pop("guard_limit", None))
    given: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or value == () or (key == "recycle" and value is False):
            continue
        if key == "thresholds":
            value = _thresholds(value)
        elif isinstance(value, tuple):
            value = list(value)
        given[key] = value
    if guard is not None:
        given["guard"] = guard
    try:
        if config_file is not None:
            table, source = file_options(config_file), config_file
        else:
            table, source = project_options()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if table:
        try:
            Config.from_kwargs(**table)
        except (TypeError, ValueError) as exc:
            raise click.UsageError(f"{source}: {exc}") from None
        if "thresholds" in given and isinstance(table.get("thresholds"), dict):
            # each --threshold overrides one threshold, not the file's whole table of them
            given["thresholds"] = {**table["thresholds"], **given["thresholds"]}
    try:
        return Config.from_kwargs(**{**table, **given})
    except (TypeError, ValueError) as exc:
        raise click.UsageError(_as_flag(str(exc), set(given))) from None


def _as_flag(message: str, keys: set[str]) -> str:
    """A Config error about one of ``keys`` (given on the command line), worded with the
    option the user typed: ``name='x': ...`` -> ``--name 'x': ...``, ``thresholds: ...`` ->
    ``--threshold: ...``."""
    for key in keys:
        flag = "--threshold" if key == "thresholds" else "--" + key.replace("_", "-")
        if message.startswith(f"{key}="):
            return f"{flag} {message[len(key) + 1:]}"
        if message.startswith(f"{key}:"):
            return flag + message[len(key):]
    return message


def _thresholds(pairs: tuple[str, ...]) -> dict[str, float]:
    """``--threshold NAME=VALUE`` pairs, each checked against its threshold's range."""
    from .rules.thresholds import Thresholds

    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, text = (part.strip() for part in pair.partition("="))
        try:
            if not sep or not name:
                raise ValueError
            value = int(text) if _is_integer(text) else float(text)
        except ValueError:
            raise click.UsageError(f"--threshold {pair!r}: expected NAME=NUMBER, e.g. "
                                   "dead_fraction=0.6") from None
        try:
            out[name] = Thresholds.range_of(name).check(value)
        except (TypeError, ValueError) as exc:
            raise click.UsageError(f"--threshold {pair!r}: {exc}") from None
    return out


class _RunCommand(click.Command):
    """``run``'s parsing: gradscope's options end at the script (or at ``-m MODULE``, or at
    ``--``); everything after belongs to the script, even what looks like gradscope's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {name for p in self.params if isinstance(p, click.Option)
                       and not p.is_flag for name in p.opts}
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
                out += ["-m", arg[2:], *args[i + 1:]]
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
@click.option("-m", "as_module", is_flag=True,
              help="Run a module, as python -m does (SCRIPT is the module name).")
@click.option("--nproc-per-node", "nproc", metavar="N",
              help="Start N processes with torch.distributed.run (torchrun --standalone), each "
                   "running the script under gradscope; rank 0 writes the run directory. "
                   "For several nodes: torchrun ... -m gradscope run SCRIPT.")
@config_options
@click.argument("script", metavar="SCRIPT | -m MODULE")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(script: str, args: tuple[str, ...], as_module: bool, nproc: str | None,
        **options: Any) -> Any:
    """Run SCRIPT with ARGS as `python SCRIPT ARGS...` would, with gradscope attached.

    \b
      gradscope run train.py --lr 3e-4
      gradscope run --clip autoclip -m mypackage.train --epochs 3

    The options before SCRIPT are gradscope's; everything after it is the script's. Models
    are found at their first training forward pass and optimizers at their first step; the
    run directory is written however the script ends, and the exit code is the script's.
    """
    from . import runner

    if nproc is not None and not (nproc.isdigit() and int(nproc) > 0) and \
            nproc not in ("auto", "cpu", "gpu"):
        raise click.UsageError(f"--nproc-per-node {nproc!r}: expected a positive number of "
                               "processes, or auto, cpu or gpu (as torchrun accepts)")
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
        return runner.launch_workers(nproc, _without_nproc(raw))
    return runner.run(target, list(args), config)


def _without_nproc(argv: list[str]) -> list[str]:
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
        raise click.UsageError(f"--out {str(out)!r}: cannot create the output root "
                               f"({exc.strerror or exc})") from None
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
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Output root for the run directory.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps.")
@remedy_options
def demo(out: Path, steps: int, clip: str | None, guard: bool | None, guard_limit: int | None,
         swap: str | None, recycle: bool) -> None:
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
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write it  [default: RUN/report.html].")
def report(run: Path, output: Path | None) -> None:
    """Write the HTML report of the run directory RUN (one self-contained file).

    A run that crashed or was killed gets a partial report that says what is missing.
    """
    from .report import write_report

    _write_page(write_report, run, output)


@main.command()
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write it  [default: compare-A-vs-B.html here].")
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
@click.option("--top", type=click.IntRange(min=0), default=25, show_default=True,
              help="Show only the N layers that most need a look (0: all).")
def summary(run: Path, top: int) -> None:
    """Print the findings and a per-layer table of the run directory RUN."""
    from .load import load_run
    from .sinks.console import print_summary

    try:
        loaded = load_run(run)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    print_summary(loaded, top=top)


@main.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=6006, show_default=True,
              help="Port to serve on (0: any free port).")
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
            raise click.UsageError(f"{run}: no {rundir.TB}/ folder (a run with "
                                   "tensorboard=False, or not a gradscope run directory)")
        name = run.resolve().name
        while name.lower() in {n.lower() for n in boards}:  # case-insensitive file systems
            name += "_"
        boards[name] = tb.resolve()
    from tensorboard import program

    logdir, links = _link_runs(boards)
    try:
        # TensorBoard names each run by its folder below --logdir: the run directory's name,
        # whatever it holds (--logdir_spec would split names and paths on ',' and ':')
        where = ["--logdir", str(logdir)] if logdir is not None else \
            ["--logdir_spec", ",".join(f"{_spec_safe(n)}:{tb}" for n, tb in boards.items())]
        board = program.TensorBoard()
        board.configure(argv=[None, *where, "--port", str(port), "--host", host])
        try:
            url = board.launch()
        except Exception as exc:  # a taken port, a bad host
            raise click.UsageError(f"TensorBoard could not start: {exc}") from None
        click.echo(f"TensorBoard on {url} (Ctrl-C to stop); custom scalars: "
                   f"{url}#custom_scalars")
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
        _unlink_runs(logdir, links)


def _link_runs(boards: dict[str, Path]) -> tuple[Path | None, list[Path]]:
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
        _unlink_runs(logdir, links)
        return None, []
    return logdir, links


def _unlink_runs(logdir: Path | None, links: list[Path]) -> None:
    """Remove what :func:`_link_runs` made: the links alone (never what they point to), then
    the folder."""
    for link in links:
        with contextlib.suppress(OSError):
            link.unlink()
    if logdir is not None:
        with contextlib.suppress(OSError):
            logdir.rmdir()


def _spec_safe(name: str) -> str:
    """A run name TensorBoard's ``--logdir_spec`` keeps whole (it splits on ',' and ':')."""
    return name.replace(",", "_").replace(":", "_")


if __name__ == "__main__":  # pragma: no cover
    main()
