"""The one source of truth for gradscope's settings.

``watch(model, **config)``, the CLI flags and ``[tool.gradscope]`` in a pyproject.toml all become a
:class:`Config` here, so a value is parsed and checked once, at the boundary, and a bad one fails
with a one-line error that names it and says what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args

from .remedies.spec import (
    ClipSpec,
    SwapRule,
    parse_clip,
    parse_guard,
    parse_recycle,
    parse_swap,
)
from .rules.thresholds import Thresholds

FLUSH_STEPS = 100  # the default cadence: steps between flushes...
FLUSH_MIN_SECS = 5.0  # ...but no sooner than this after the previous one...
FLUSH_MAX_STEPS = 2000  # ...and at the latest after this many steps
FLUSH_SHARE = 0.02  # a flush that costs more than this share of the gap widens the gap...
FLUSH_MAX_SECS = 120.0  # ...up to this

TypeSpec = Union[type, str]
"""A module type given as a class (``nn.ReLU``) or as its class name (``"ReLU"``)."""

StepOn = Literal["auto", "optimizer", "backward"]
"""Where a step ends (``Config.step_on``)."""
TraceMode = Literal["auto", "always", "off"]
"""When the NaN/Inf tracer runs (``Config.trace_nonfinite``)."""
STEP_MODES: tuple[StepOn, ...] = get_args(StepOn)
TRACE_MODES: tuple[TraceMode, ...] = get_args(TraceMode)


@dataclass(frozen=True)
class Config:
    """Everything gradscope can be told. Every field has a working default.

    Attributes:
        out: Output root; each run gets its own directory below it.
        name: Run directory name. Default: ``<YYYYmmdd-HHMMSS>-<model class>``. A name that is
            already taken gets a ``-1``, ``-2`` ... suffix; it is never overwritten. One plain
            directory name of at most 240 bytes in the file system encoding.
        flush_every: Steps buffered on the device between two host transfers (and Parquet
            chunks); a ``kill -9`` loses at most the steps since the last flush. Default (None):
            every ``FLUSH_STEPS`` (100) steps, the first at once, each later one no sooner than
            ``FLUSH_MIN_SECS`` (5) seconds after the previous flush (longer when the last flush
            took more than ``FLUSH_SHARE``, 2%, of that time, up to ``FLUSH_MAX_SECS``, 120 s),
            and at the latest after ``FLUSH_MAX_STEPS`` (2,000) steps: a flush costs the same
            whatever the step costs (the rules, the sinks), so fast steps would pay it often
            for nothing new (docs/costs.md, "The step buffer and the flush"). With several
            processes (the flushes are collectives) the default is every 100 steps. An
            integer: exactly every that many steps.
        flush_secs: Also flush when this many seconds have passed since the last flush, so slow
            steps do not hold data back for long.
        activation_every: Activation statistics and the backward signal are taken every this
            many steps (step 0 included). Gradient norms are taken every step.
        update_every: Update ratios, weight norms and maximum absolute gradients are taken every
            this many steps. Default (None): twice ``activation_every`` (20). They cost several
            passes over the weights (a copy, a difference, norms), the largest per-sample cost
            on parameter-heavy models, hence a separate setting; every 20 rather than 10 steps
            halves that cost and found the same pathologies on the corpus
            (docs/costs.md, "What you can turn down").
        include: Glob patterns (``fnmatch``) on qualified names; when given, only parameters and
            activation modules whose own name or owning module's name matches are watched.
        exclude: Glob patterns that remove parameters and modules, applied after ``include``.
        include_types: Only watch modules of these types (classes or class names).
        exclude_types: Never watch modules of these types.
        activation_types: Extra module types to treat as activations (their outputs get dead
            fraction, mean, std and non-finite statistics).
        dead_threshold: A unit is dead when its output is ``<= dead_threshold`` for every example
            (and every position) of the step's batches.
        sigmoid_saturation: A sigmoid output ``y`` is saturated when ``|y - 0.5| > this``.
        tanh_saturation: A tanh output ``y`` is saturated when ``|y| > this``.
        softmax_saturation: A softmax distribution is saturated when its largest probability
            is ``> this``.
        update_ratio: Record ``||Δw|| / ||w||`` per parameter on sampled steps. Keeps one copy of
            the watched parameters as a snapshot buffer; turn off to save that memory.
        backward_signal: Record the norm of the gradient with respect to each watched module's
            output on sampled steps (tensor hooks on the outputs; skipped under torch.compile).
        functional_activations: Also measure activations called as functions inside a
            watched model's ``forward()`` (``F.relu(self.conv1(x))``, ``torch.sigmoid(h)``,
            ``x.tanh()``), as sites named ``<layer>:<function>`` (``conv1:relu``): on sampled
            steps a ``TorchFunctionMode`` sees every torch call of the forward (eager models
            only; docs/costs.md gives what it costs).
        tensorboard: Write TensorBoard logs to ``tb/`` in the run directory: scalars tagged
            ``<metric>/<layer>`` and ``<metric>`` (run level), a Custom Scalars layout (one
            chart per metric across layers), findings and remedy actions as text.
        tb_max_layers: At most this many per-layer TensorBoard tags per metric (0: no limit).
            A metric recorded for more layers gets the worst ones, chosen at the first flush
            that has its data and kept for the whole run (charts need stable tags), plus
            ``<metric>/_min``, ``/_median`` and ``/_max`` across all its layers at every step.
            Worst: the layers with the largest and the smallest median value, half each
            (``grad_norm``, ``weight_norm``, ``update_ratio``, ``act_std``...); the largest
            (``grad_max_abs``, dead fraction, saturation, non-finite counts); the largest
            ``|median|`` (``act_mean``); the smallest (``clip_coef``). A layer with
            non-finite values comes first. A layer named by a finding gets its tags from
            then on. Every record is in the Parquet store either way.
        histograms: Also write a histogram of each watched parameter's gradient to
            TensorBoard (tag ``grad_hist/<parameter>``, 30 bins from its min to its max) every
            ``update_every`` steps; for the parameters ``tb_max_layers`` shows. Costs one
            pass over the gradients on those steps. Off by default.
        step_on: What ends a step. ``"auto"``: an optimizer step when an optimizer steps this
            model's parameters, otherwise a backward pass. ``"optimizer"`` / ``"backward"``
            force one of the two. Calling ``Scope.step()`` switches to manual stepping.
        diagnose: Run the rules (``gradscope.rules``) on the records at every flush and raise
            findings. Off: records only.
        trace_nonfinite: Name the module that first produced a NaN/Inf. ``"auto"``: a cheap
            per-step check (the gradient norms, the loss). Where it is read before the
            optimizer step (the CPU), a hit replays that step's forward calls with a tracer
            that checks every module's outputs and gradients, then puts back what the replay
            touched, so the culprit is named on the step it happened; elsewhere (or if the
            replay names none) the hit arms the tracer for the next steps until it has
            named one. ``"always"``:
            trace from step 0 (finds a one-off NaN at its first occurrence; costs more).
            ``"off"``: no tracer (non-finite values are still counted and reported).
        quiet: Do not print findings to stderr as they are raised, nor the end-of-run summary.
        report: Write ``report.html`` (the HTML report) into the run directory when the run
            ends, however it ends. Off: ``gradscope report RUN`` writes it later.
        thresholds: Overrides of the rules' thresholds, e.g. ``{"dead_fraction": 0.6}``
            (see :class:`gradscope.rules.thresholds.Thresholds` for each default and its source).
        clip: Clip gradients right before each optimizer step, on the device (no host read):
            ``"norm:1.0"`` (``clip_grad_norm_``), ``"autoclip:p=10"`` (AutoClip),
            ``"agc:0.01"`` (unit-wise AGC, final layer left out), ``"zclip"`` (ZClip,
            ``z=2.5,alpha=0.97,warmup=25``); ``per_layer`` clips each parameter tensor on its
            own. Off by default. See ``gradscope.remedies.spec`` for every parameter.
        guard: Skip an optimizer step whose gradients hold NaN/Inf (weights and optimizer
            state unchanged) and stop with ``NonfiniteStepsError`` after too many in a row:
            ``True`` allows 10, an integer sets the number. Reads one flag on the host per step
            (a device sync on GPUs). Under a GradScaler, which skips such steps itself, it only
            records. Off by default.
        swap: Replace an activation module when ``dead_units`` or ``saturation`` is found on
            it: ``"relu->leaky_relu:0.01"``, ``"relu->gelu"``, ``"sigmoid->relu"``,
            ``"tanh->relu"``; several joined by ``;``. Off by default.
        recycle: Re-initialise the dead units of a layer with a ``dead_units`` finding
            (ReDo: fresh incoming weights, zero outgoing weights, optimizer state reset; the
            output is unchanged at that step). Off by default.
    """

    out: Path = Path("reports")
    name: str | None = None
    flush_every: int | None = None
    flush_secs: float = 10.0
    activation_every: int = 10
    update_every: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_types: tuple[TypeSpec, ...] = ()
    exclude_types: tuple[TypeSpec, ...] = ()
    activation_types: tuple[TypeSpec, ...] = ()
    dead_threshold: float = 0.0
    sigmoid_saturation: float = 0.49
    tanh_saturation: float = 0.99
    softmax_saturation: float = 0.99
    update_ratio: bool = True
    backward_signal: bool = True
    functional_activations: bool = True
    tensorboard: bool = True
    tb_max_layers: int = 50
    histograms: bool = False
    step_on: StepOn = "auto"
    diagnose: bool = True
    trace_nonfinite: TraceMode = "auto"
    quiet: bool = False
    report: bool = True
    thresholds: Thresholds = field(default_factory=Thresholds)
    clip: ClipSpec | None = None
    guard: int = 0
    swap: tuple[SwapRule, ...] = ()
    recycle: bool = False

    @property
    def resolved_update_every(self) -> int:
        """``update_every``, or its default: twice ``activation_every``."""
        return self.update_every or 2 * self.activation_every

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.out, (str, Path)):
            raise TypeError(f"out={self.out!r}: expected a path (str or pathlib.Path)")
        set_(self, "out", Path(self.out).expanduser())
        if self.name is not None:
            set_(self, "name", _check_run_name(self.name))
        if self.flush_every is not None:
            _check_int("flush_every", self.flush_every, minimum=1)
        _check_int("activation_every", self.activation_every, minimum=1)
        if self.update_every is not None:
            _check_int("update_every", self.update_every, minimum=1)
        _check_number("flush_secs", self.flush_secs, low=0.0, low_open=True)
        for key in ("include", "exclude"):
            set_(self, key, _as_patterns(key, getattr(self, key)))
        for key in ("include_types", "exclude_types", "activation_types"):
            set_(self, key, _as_types(key, getattr(self, key)))
        _check_number("dead_threshold", self.dead_threshold)
        _check_number("sigmoid_saturation", self.sigmoid_saturation, low=0.0, high=0.5)
        _check_number("tanh_saturation", self.tanh_saturation, low=0.0, high=1.0)
        _check_number("softmax_saturation", self.softmax_saturation, low=0.0, high=1.0)
        _check_int("tb_max_layers", self.tb_max_layers, minimum=0)
        for key in (
            "update_ratio",
            "backward_signal",
            "functional_activations",
            "tensorboard",
            "histograms",
            "diagnose",
            "quiet",
            "report",
        ):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key}={getattr(self, key)!r}: expected True or False")
        if self.step_on not in STEP_MODES:
            raise ValueError(f"step_on={self.step_on!r}: expected one of {', '.join(STEP_MODES)}")
        if self.trace_nonfinite not in TRACE_MODES:
            raise ValueError(
                f"trace_nonfinite={self.trace_nonfinite!r}: expected one of "
                f"{', '.join(TRACE_MODES)}"
            )
        set_(self, "thresholds", Thresholds.from_any(self.thresholds))
        set_(self, "clip", parse_clip(self.clip))
        set_(self, "guard", parse_guard(self.guard))
        set_(self, "swap", parse_swap(self.swap))
        set_(self, "recycle", parse_recycle(self.recycle))
        if (self.swap or self.recycle) and not self.diagnose:
            raise ValueError(
                f"{'swap' if self.swap else 'recycle'}= acts on findings, and diagnose=False "
                "turns the rules off: drop one of the two"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Config:
        """Build a Config from keyword arguments, rejecting unknown keys with a suggestion."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown gradscope option {key!r}{hint}; accepted: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated like the constructor)."""
        Config.from_kwargs(**changes)  # reject unknown keys with the same message
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable view (types by name, paths as strings), for run.json."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Thresholds):
                value = value.to_json()
            elif isinstance(value, ClipSpec):
                value = str(value)
            elif f.name == "swap":
                value = [str(r) for r in value]
            elif isinstance(value, tuple):
                value = [v if isinstance(v, str) else v.__name__ for v in value]
            out[f.name] = value
        return out


PYPROJECT = "pyproject.toml"


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict (one-line ValueError naming the file otherwise)."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    try:
        return dict(tomllib.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ValueError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"{what}: not valid TOML ({exc})") from None


def project_options(start: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The ``[tool.gradscope]`` table of the nearest ``pyproject.toml`` at or above ``start``
    (default: the working directory), and that file; ``({}, None)`` when there is none.

    Raises:
        ValueError: The file is not valid TOML, or the table is not a table (one line, naming
            the file).
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        path = folder / PYPROJECT
        if not path.is_file():
            continue
        tool = _read_toml(path, f"{path}: cannot read [tool.gradscope]").get("tool", {})
        table = tool.get("gradscope") if isinstance(tool, dict) else None
        if table is None:
            return {}, None
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [tool.gradscope] must be a table of options")
        return dict(table), path
    return {}, None


def file_options(path: Path) -> dict[str, Any]:
    """Options from a TOML file given by name (``gradscope run --config FILE``): its
    ``[tool.gradscope]`` table, a ``[gradscope]`` table, or its top-level keys.

    Raises:
        ValueError: The file cannot be read, is not TOML, or the options are not a table.
    """
    data = _read_toml(path, f"--config {path}")
    tool = data.get("tool")
    if isinstance(tool, dict) and "gradscope" in tool:
        table = tool["gradscope"]
    else:
        table = data.get("gradscope", data)
    if not isinstance(table, dict):
        raise ValueError(f"--config {path}: the gradscope options must be a table")
    return dict(table)


MAX_NAME_BYTES = 240
"""The longest run name, in bytes of the file system encoding: a directory name holds 255 bytes
on common file systems (ext4, XFS, APFS), less room for the ``-N`` suffix a taken name gets."""


def _check_run_name(name: object) -> str:
    """A run name is one plain directory name: it can never escape the output root, and the
    file system can create it (checked here, before a script starts, not when the run
    directory is made)."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r}: expected a string")
    bad = (
        not name
        or name in (".", "..")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or name != name.strip()
        or Path(name).is_absolute()
    )
    if bad:
        raise ValueError(
            f"name={name!r}: expected a plain directory name (no '/', '\\', '..' or "
            "surrounding spaces) so the run stays inside the output root"
        )
    try:
        size = len(os.fsencode(name))
    except UnicodeError:
        raise ValueError(
            f"name={name!r}: not encodable in the file system encoding "
            f"({sys.getfilesystemencoding()}): expected a name the file system can store"
        ) from None
    if size > MAX_NAME_BYTES:
        shown = f"{name[:20]}...{name[-10:]}" if len(name) > 40 else name
        raise ValueError(
            f"name={shown!r}: {size} bytes long in the file system encoding "
            f"({sys.getfilesystemencoding()}); expected at most {MAX_NAME_BYTES} (a directory "
            "name holds 255 bytes, less room for the '-N' suffix a taken name gets)"
        )
    return name


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key}={value!r}: expected an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{key}={value!r}: expected an integer >= {minimum}")


def _check_number(
    key: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key}={value!r}: expected a number")
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    accepted = f"a finite number in {'(' if low_open else '['}{lo}, {hi}]"
    if not math.isfinite(value):
        raise ValueError(f"{key}={value!r}: expected {accepted}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{key}={value!r}: expected {accepted}")
    if high is not None and value > high:
        raise ValueError(f"{key}={value!r}: expected {accepted}")


def _as_patterns(key: str, value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise TypeError(f"{key}={value!r}: expected a glob pattern or a list of them")
    out = tuple(items)
    for item in out:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{key}: {item!r} is not a glob pattern (expected a non-empty string)")
    return out


def _as_types(key: str, value: object) -> tuple[TypeSpec, ...]:
    items = (value,) if isinstance(value, (str, type)) else value
    if not isinstance(items, Iterable):
        raise TypeError(f"{key}={value!r}: expected module classes or class names")
    out = tuple(items)
    for item in out:
        if not (isinstance(item, str) and item) and not isinstance(item, type):
            raise TypeError(
                f"{key}: {item!r} is not a module type (expected a class such as nn.ReLU "
                "or a class name such as 'ReLU')"
            )
    return out


def type_matches(module: object, specs: tuple[TypeSpec, ...]) -> bool:
    """Whether ``module`` is an instance of one of ``specs`` (classes, or class names found in
    its MRO)."""
    for spec in specs:
        if isinstance(spec, type):
            if isinstance(module, spec):
                return True
        elif any(cls.__name__ == spec for cls in type(module).__mro__):
            return True
    return False
