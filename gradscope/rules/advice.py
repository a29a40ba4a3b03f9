"""Advice that fits the run: what the rules know about it, and how they name gradscope's options.

:class:`RunContext` is what the rules know about the run besides its records: how it was started
(``watch()`` or ``gradscope run``), the optimizers and their learning rates, whether the model
has normalisation layers, which activation types it uses, and which remedies are in force. The
flusher builds it at every flush (:func:`gradscope.flusher.run_context`); a rule reads it as
``records.context``.

A rule never spells a gradscope option itself: it writes :func:`option` (an invocation to try:
``gradscope.watch(..., clip='zclip')`` / ``gradscope run --clip zclip ...``) or :func:`setting`
(the option as applied: ``clip='zclip'`` / ``--clip zclip``), which leave a marker in the text,
and :func:`render` turns every marker of a finding into the form of the run that raised it,
when the finding is made. So one line never mixes the two forms. Nothing here imports torch.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Launcher = Literal["watch", "run"]

NORM_TYPES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LocalResponseNorm",
)
"""Module classes that count as normalisation layers."""


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer: its class name, and the largest learning rate over its param groups now
    and at the start (``initial_lr`` where a scheduler set it, else the first one seen)."""

    name: str
    lr: float | None = None
    initial_lr: float | None = None


@dataclass(frozen=True)
class RunContext:
    """What the rules know about the run besides its records.

    Attributes:
        launcher: ``"watch"`` (``gradscope.watch()`` in the script) or ``"run"``
            (``gradscope run``): how options are spelled in advice.
        optimizers: The optimizers seen stepping the watched parameters.
        norms: Class names of the normalisation layers in the watched models.
        activations: Class names of the activation modules in the watched models.
        clip: The ``clip=`` option in force (its canonical text), or None.
        clip_bound: The fixed bound of a global ``norm`` clip (None: adaptive, per layer, off).
        clip_from: The first step clipping acted on (None: not yet, or off).
        guard: ``guard=``'s limit of non-finite steps in a row (0: off).
        guard_skipped: Optimizer steps the guard skipped so far.
        swap: The ``swap=`` rules in force (their text).
        swapped: Swaps done so far: ``site -> (step, from class, to class)``.
        recycle: ``recycle=True``.
    """

    launcher: Launcher = "watch"
    optimizers: tuple[OptimizerInfo, ...] = ()
    norms: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    clip: str | None = None
    clip_bound: float | None = None
    clip_from: int | None = None
    guard: int = 0
    guard_skipped: int = 0
    swap: tuple[str, ...] = ()
    swapped: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    recycle: bool = False

    @property
    def optimizer(self) -> OptimizerInfo | None:
        """The optimizer advice names: the first one with a known learning rate."""
        return next((o for o in self.optimizers if o.lr is not None), None)

    @property
    def has_norm(self) -> bool:
        return bool(self.norms)


# -- options ----------------------------------------------------------------------------------
_MARK = "\x1f"  # ASCII unit separator: never in a message, a layer name or a value we write
_MARKER = re.compile(_MARK + r"(opt|set)\x1e(\w+)\x1e([^\x1f]*)" + _MARK)
_BARE_FLAGS = ("recycle", "guard")  # spelled without a value on the command line


def option(name: str, value: str | bool) -> str:
    """A gradscope option to try, spelled as the run needs it (see :func:`render`):
    ``gradscope.watch(..., name=value)`` or ``gradscope run --name value ...``."""
    return f"{_MARK}opt\x1e{name}\x1e{_value(value)}{_MARK}"


def setting(name: str, value: str | bool) -> str:
    """A gradscope option as it is set in this run: ``name=value`` or ``--name value``."""
    return f"{_MARK}set\x1e{name}\x1e{_value(value)}{_MARK}"


def _value(value: str | bool) -> str:
    return "\x00True" if value is True else "\x00False" if value is False else value


def _spell(form: str, name: str, raw: str, launcher: Launcher) -> str:
    boolean = raw.startswith("\x00")
    if launcher == "run":
        flag = "--" + name.replace("_", "-")
        if boolean:
            on = raw == "\x00True"
            text = (flag if on else f"--no-{flag[2:]}") if name in _BARE_FLAGS else f"{flag} {on}"
        else:
            text = f"{flag} {shlex.quote(raw)}"
        return f"gradscope run {text} ..." if form == "opt" else text
    text = f"{name}={raw[1:] if boolean else repr(raw)}"
    return f"gradscope.watch(..., {text})" if form == "opt" else text


def render(text: str, context: RunContext | None = None) -> str:
    """``text`` with every option marker spelled for the run's launcher (default: ``watch()``).
    An option suggested with the value already in force is said to be on, not suggested."""
    if _MARK not in text:
        return text
    ctx = context or RunContext()
    active = {
        "guard": "\x00True" if ctx.guard else None,
        "recycle": "\x00True" if ctx.recycle else None,
    }

    def spell(m: re.Match[str]) -> str:
        form, name, raw = m.group(1), m.group(2), m.group(3)
        on = active.get(name) == raw or (name == "swap" and raw in ctx.swap)
        if form == "opt" and on:
            return f"{_spell('set', name, raw, ctx.launcher)} (on in this run)"
        return _spell(form, name, raw, ctx.launcher)

    return _MARKER.sub(spell, text)


# -- phrases built from the context -----------------------------------------------------------
def fmt(x: float) -> str:
    """A number for advice: 3 significant digits."""
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def lr_now(ctx: RunContext) -> str | None:
    """``"SGD at lr 2"``, or None when no learning rate is known."""
    opt = ctx.optimizer
    if opt is None or opt.lr is None:
        return None
    return f"{opt.name} at lr {fmt(opt.lr)}"


def lower_lr(ctx: RunContext, low: float = 0.1, high: float = 0.25) -> str:
    """Advice to lower the learning rate, with the run's optimizer and a range to try
    (``low``-``high`` times the current one)."""
    opt = ctx.optimizer
    if opt is None or opt.lr is None or not opt.lr > 0:
        return "lower the learning rate"
    return (
        f"lower the learning rate ({opt.name} at lr {fmt(opt.lr)}: try lr "
        f"{fmt(opt.lr * low)}-{fmt(opt.lr * high)})"
    )


def normalisation(ctx: RunContext, what: str = "normalisation (LayerNorm/BatchNorm)") -> str:
    """``add <what>`` where the model has no normalisation layer; otherwise what else to check
    about the ones it has."""
    if not ctx.has_norm:
        return f"add {what}"
    names = "/".join(ctx.norms[:3])
    return (
        f"check where its normalisation ({names}) sits: one before each activation keeps "
        "pre-activations in range"
    )


SUGGESTED_OPTIONS = {
    "loss_spike": ("clip",),
    "nonfinite": ("guard", "trace_nonfinite"),
}
"""The gradscope options a finding of each kind may suggest: those that cured the runs they were
suggested for on the pathology corpus (benchmarks/zoo, every split: ``clip='zclip'`` 32 of 32
loss spikes, ``guard=True`` 12 of 12 one-off NaNs). The others cured few or none and are not
suggested (the advice names the fix in the code instead): clipping an explosion or a
divergence (1 of 31, 0 of 52), swapping or recycling dead units (5 of 32, 0 of 20), swapping a
saturated sigmoid/tanh to ReLU (0 of 24). docs/remedies.md, "What cures what"."""


def clip_in_code(ctx: RunContext, healthy_norm: float | None) -> str:
    """Clipping advice for an explosion, in code (no gradscope option: applied to the corpus'
    explosions, ``clip=`` cured 1 of 31): a bound at the run's healthy median total norm, where
    it had a healthy stretch, else 1.0. With a clip in force, what is left to do."""
    if ctx.clip is not None:
        return (
            f"clipping ({setting('clip', ctx.clip)}) already bounds each update; what makes "
            "the gradients grow is still there"
        )
    bound = f"{healthy_norm:.3g}" if healthy_norm is not None and healthy_norm > 0 else "1.0"
    where = (
        "the median total norm before this episode"
        if healthy_norm is not None and healthy_norm > 0
        else "a common default"
    )
    return (
        "clip in the training loop, before optimizer.step(): torch.nn.utils.clip_grad_norm_("
        f"model.parameters(), max_norm={bound}) ({where}); a bound taken from the exploding "
        "steps themselves holds nothing back"
    )
