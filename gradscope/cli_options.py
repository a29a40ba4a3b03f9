"""The command line's options: every :class:`gradscope.Config` field and the remedies as click
options, the older ``--guard N`` spellings, and the run's Config built from what was given."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

GUARD_HELP = (
    "Skip optimizer steps whose gradients hold NaN/Inf; stop after --guard-limit of "
    "them in a row. Older spellings, still accepted: --guard N (the limit; 0: off), "
    "--guard true/false (an integer or true/false right after --guard is its value)."
)


def remedy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The remedy options, the same strings as ``watch(clip=..., guard=..., swap=...,
    recycle=...)``; checked by :class:`gradscope.Config` (a bad one is a one-line usage
    error). ``--guard`` is a flag; the command's ``parse_args`` turns the older ``--guard N``
    spellings into ``--guard-limit N`` first (:func:`_guard_spelling`)."""
    fn = click.option(
        "--recycle",
        is_flag=True,
        default=False,
        help="Re-initialise dead units (ReDo) when dead_units is found.",
    )(fn)
    fn = click.option(
        "--swap",
        metavar="SPEC",
        default=None,
        help="Swap activations on a finding, e.g. 'relu->leaky_relu:0.2'.",
    )(fn)
    fn = click.option(
        "--guard-limit",
        type=click.IntRange(min=1),
        metavar="N",
        default=None,
        help="Skipped steps in a row before --guard stops the run (implies "
        "--guard)  [default: 10].",
    )(fn)
    fn = click.option("--guard/--no-guard", default=None, help=GUARD_HELP)(fn)
    fn = click.option(
        "--clip",
        metavar="SPEC",
        default=None,
        help="Clip gradients: 'norm:1.0', 'autoclip', 'agc:0.01', 'zclip'.",
    )(fn)
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
        value, used = arg[len("--guard=") :], 1
    elif i + 1 < len(args) and (
        args[i + 1].strip().lower() in _TRUE_WORDS + _FALSE_WORDS
        or _is_integer(args[i + 1].strip())
    ):
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
        "the older spellings: an integer >= 0 (the limit; 0: off) or true/false",
        ctx,
    )


def guard_option(guard: bool | None, limit: int | None) -> bool | int | None:
    """``watch(guard=...)`` from ``--guard/--no-guard`` and ``--guard-limit``; None: neither
    given."""
    if limit is not None:
        if guard is False:
            raise click.UsageError(
                f"--no-guard and --guard-limit {limit}: the limit is for "
                "the guard that --no-guard turns off; drop one"
            )
        return limit
    return guard


def remedy_config(
    clip: str | None, guard: bool | None, guard_limit: int | None, swap: str | None, recycle: bool
) -> dict[str, Any]:
    """The remedy options as ``watch`` keywords, validated now (a usage error, not a
    traceback)."""
    from .config import Config

    guard_value = guard_option(guard, guard_limit)
    opts: dict[str, Any] = {
        "clip": clip,
        "guard": guard_value or False,
        "swap": swap,
        "recycle": recycle,
    }
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
        opt(
            "--config",
            "config_file",
            metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Options from this TOML file ([tool.gradscope] or top-level keys) instead of "
            "the working directory's pyproject.toml.",
        ),
        opt("--out", metavar="DIR", default=None, help="Output root  [default: reports]."),
        opt(
            "--name",
            default=None,
            help="Run directory name, at most 240 bytes  [default: time-model].",
        ),
        opt("--flush-every", type=int, metavar="N", help="Steps between host transfers."),
        opt("--flush-secs", type=float, metavar="SECS", help="Also flush after this long."),
        opt(
            "--activation-every", type=int, metavar="N", help="Activation statistics every N steps."
        ),
        opt(
            "--update-every",
            type=int,
            metavar="N",
            help="Update ratios and weight norms every N steps.",
        ),
        opt("--include", multiple=True, metavar="GLOB", help="Watch only matching names."),
        opt("--exclude", multiple=True, metavar="GLOB", help="Do not watch matching names."),
        opt(
            "--include-types", multiple=True, metavar="TYPE", help="Watch only these module types."
        ),
        opt(
            "--exclude-types", multiple=True, metavar="TYPE", help="Never watch these module types."
        ),
        opt(
            "--activation-types",
            multiple=True,
            metavar="TYPE",
            help="More module types to treat as activations.",
        ),
        opt(
            "--dead-threshold",
            type=float,
            metavar="X",
            help="A unit is dead when its output is <= X.",
        ),
        opt(
            "--sigmoid-saturation",
            type=float,
            metavar="X",
            help="A sigmoid output y is saturated when |y - 0.5| > X.",
        ),
        opt(
            "--tanh-saturation",
            type=float,
            metavar="X",
            help="A tanh output y is saturated when |y| > X.",
        ),
        opt(
            "--softmax-saturation",
            type=float,
            metavar="X",
            help="A softmax row is saturated when its max > X.",
        ),
        opt(
            "--update-ratio/--no-update-ratio",
            default=None,
            help="Record ||dw||/||w|| (keeps a copy of the weights).",
        ),
        opt(
            "--backward-signal/--no-backward-signal",
            default=None,
            help="Record each module's output-gradient norm.",
        ),
        opt(
            "--functional-activations/--no-functional-activations",
            default=None,
            help="Also measure F.relu/torch.sigmoid/x.tanh() called inside forward().",
        ),
        opt("--tensorboard/--no-tensorboard", default=None, help="Write TensorBoard logs."),
        opt(
            "--tb-max-layers",
            type=int,
            metavar="N",
            help="Per-layer TensorBoard tags per metric: the N worst plus min/median/max "
            "(0 = all).",
        ),
        opt(
            "--histograms/--no-histograms",
            default=None,
            help="TensorBoard histograms of each gradient every update_every steps.",
        ),
        opt(
            "--step-on",
            type=click.Choice(["auto", "optimizer", "backward"]),
            default=None,
            help="What ends a step.",
        ),
        opt("--diagnose/--no-diagnose", default=None, help="Run the rules."),
        opt(
            "--trace-nonfinite",
            type=click.Choice(["auto", "always", "off"]),
            default=None,
            help="Name the module that first produced a NaN/Inf.",
        ),
        opt(
            "--threshold",
            "thresholds",
            multiple=True,
            metavar="NAME=VALUE",
            help="Override a rule threshold, e.g. dead_fraction=0.6 (each has a range: "
            "gradscope.rules.thresholds.Thresholds); the file's other thresholds stay.",
        ),
        opt(
            "--quiet/--no-quiet",
            "-q",
            default=None,
            help="Print nothing (the run directory has everything).",
        ),
        opt(
            "--report/--no-report",
            default=None,
            help="Write report.html into the run directory at the end  [default: on].",
        ),
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
            return f"{flag} {message[len(key) + 1 :]}"
        if message.startswith(f"{key}:"):
            return flag + message[len(key) :]
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
            raise click.UsageError(
                f"--threshold {pair!r}: expected NAME=NUMBER, e.g. dead_fraction=0.6"
            ) from None
        try:
            out[name] = Thresholds.range_of(name).check(value)
        except (TypeError, ValueError) as exc:
            raise click.UsageError(f"--threshold {pair!r}: {exc}") from None
    return out
