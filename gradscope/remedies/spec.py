"""Remedy options, parsed and checked once: the same strings through the API, the CLI and a
pyproject's ``[tool.gradscope]``.

Grammar of a clip option: ``METHOD[:ARGS]``, where ``ARGS`` is a comma-separated list of
``key=value`` pairs; the method's main parameter may be given bare as the first argument, and a
bare flag name means ``flag=true``::

    norm:1.0                     clip_grad_norm_ at 1.0
    norm:max=1.0,per_layer       each parameter tensor clipped to 1.0 on its own
    autoclip                     AutoClip, p=10 (Seetharaman et al. 2020), whole history
    autoclip:p=5,history=1000    ... 5th percentile of the last 1000 norms
    agc:0.01                     unit-wise AGC (Brock et al. 2021), final layer left out
    agc:clip=0.02,eps=1e-3,skip_last=false
    zclip                        ZClip z=2.5, alpha=0.97, warmup=25, no fixed cap
    zclip:z=3,alpha=0.99,warmup=50,max=5.0

A dict (``{"method": "zclip", "z": 3}``) or a :class:`ClipSpec` is accepted too.

Swap: ``"relu->leaky_relu:0.01"``, several separated by ``;`` (``"relu->gelu;tanh->relu"``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class SpecError(ValueError):
    """A remedy option that cannot be parsed; the message is the one line the user sees."""


@dataclass(frozen=True)
class _Param:
    default: Any
    kind: str  # "float" | "int" | "bool" | "float?" (float or none)
    low: float | None = None  # inclusive unless low_open
    high: float | None = None
    low_open: bool = False
    doc: str = ""


CLIP_METHODS: dict[str, tuple[str | None, dict[str, _Param]]] = {
    # method -> (the parameter a bare first argument sets, parameters)
    "norm": (
        "max",
        {
            "max": _Param(None, "float", 0.0, low_open=True, doc="the norm to clip to"),
            "per_layer": _Param(False, "bool", doc="clip each parameter tensor on its own"),
        },
    ),
    "autoclip": (
        "p",
        {
            "p": _Param(10.0, "float", 0.0, 100.0, doc="percentile of the norm history"),
            "history": _Param(0, "int", 0.0, doc="norms kept (0: every norm seen, as the paper)"),
            "per_layer": _Param(False, "bool", doc="a history per parameter tensor"),
        },
    ),
    "agc": (
        "clip",
        {
            "clip": _Param(0.01, "float", 0.0, low_open=True, doc="lambda: max ||G_i|| / ||W_i||"),
            "eps": _Param(1e-3, "float", 0.0, doc="floor of ||W_i||"),
            "skip_last": _Param(True, "bool", doc="leave the final layer out (as NFNets do)"),
        },
    ),
    "zclip": (
        "z",
        {
            "z": _Param(2.5, "float", 0.0, low_open=True, doc="z-score that marks a spike"),
            "alpha": _Param(0.97, "float", 0.0, 1.0, low_open=True, doc="EMA decay"),
            "warmup": _Param(25, "int", 1.0, doc="finite norms collected before clipping"),
            "factor": _Param(1.0, "float", 0.0, low_open=True, doc="multiplier of the threshold"),
            "max": _Param(None, "float?", 0.0, low_open=True, doc="optional fixed cap on top"),
            "per_layer": _Param(False, "bool", doc="statistics per parameter tensor"),
        },
    ),
}


@dataclass(frozen=True)
class ClipSpec:
    """A parsed clip option: the method and every parameter (defaults filled in)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    @property
    def per_layer(self) -> bool:
        return bool(self.params.get("per_layer", False))

    def __str__(self) -> str:
        args = ",".join(f"{k}={_show(v)}" for k, v in self.params.items())
        return f"{self.method}:{args}" if args else self.method


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coerce(opt: str, key: str, raw: Any, p: _Param) -> Any:
    """One parameter value, from a string (CLI/spec) or a Python value (dict form)."""
    what = {
        "float": "a number",
        "float?": "a number or none",
        "int": "an integer",
        "bool": "true or false",
    }[p.kind]
    bad = SpecError(f"{opt}: {key}={raw!r} is not valid; expected {what}" + _range_text(p))
    value: Any
    if p.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise bad
    if p.kind == "float?" and (raw is None or str(raw).strip().lower() in ("none", "off")):
        return None
    try:
        if isinstance(raw, bool):
            raise ValueError
        if p.kind == "int":
            value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
            if value is None:
                raise ValueError
        else:
            value = float(raw)
    except (TypeError, ValueError):
        raise bad from None
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if p.low is not None and (value < p.low or (p.low_open and value == p.low)):
        raise bad
    if p.high is not None and value > p.high:
        raise bad
    return value


def _range_text(p: _Param) -> str:
    if p.low is None and p.high is None:
        return ""
    lo = "-inf" if p.low is None else f"{p.low:g}"
    hi = "inf" if p.high is None else f"{p.high:g}"
    return f" in {'(' if p.low_open else '['}{lo}, {hi}]"


def _unknown(opt: str, what: str, key: str, known: list[str]) -> SpecError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SpecError(f"{opt}: unknown {what} {key!r}{hint}; accepted: {', '.join(known)}")


def parse_clip(value: Any) -> ClipSpec | None:
    """``clip=`` as given (None, a spec string, a dict, a ClipSpec) -> a checked ClipSpec."""
    if value is None or value is False:
        return None
    if isinstance(value, ClipSpec):
        value = {"method": value.method, **value.params}
    opt = f"clip={value!r}"
    methods = sorted(CLIP_METHODS)
    pairs: list[tuple[str | None, Any]] = []
    if isinstance(value, str):
        text = value.strip()
        head, _, rest = text.partition(":")
        method = head.strip().lower()
        for i, item in enumerate(a.strip() for a in rest.split(",") if a.strip()) if rest else []:
            key, eq, raw = item.partition("=")
            if eq:
                pairs.append((key.strip().lower(), raw.strip()))
            elif i == 0 and not _is_flag(method, key):
                pairs.append((None, key))
            else:
                pairs.append((key.strip().lower(), True))
    elif isinstance(value, Mapping):
        items = dict(value)
        method = str(items.pop("method", "")).lower()
        pairs = [(str(k).lower(), v) for k, v in items.items()]
    else:
        raise SpecError(
            f"clip={value!r}: expected a string such as 'norm:1.0', 'autoclip:p=10', 'agc:0.01' "
            "or 'zclip', a dict with a 'method' key, or None"
        )
    if method not in CLIP_METHODS:
        if not method:
            raise SpecError(f"{opt}: no clipping method; accepted: {', '.join(methods)}")
        raise _unknown(opt, "clipping method", method, methods)
    positional, params = CLIP_METHODS[method]
    out: dict[str, Any] = {}
    for given, raw in pairs:
        key = str(given if given is not None else positional)
        if key not in params:
            raise _unknown(opt, f"parameter of {method}", key, sorted(params))
        out[key] = _coerce(opt, key, raw, params[key])
    for key, p in params.items():
        if key not in out:
            if p.default is None and p.kind == "float":
                raise SpecError(f"{opt}: {method} needs {key}=<{p.doc}>, e.g. '{method}:1.0'")
            out[key] = p.default
    return ClipSpec(method, {key: out[key] for key in params})


def _is_flag(method: str, key: str) -> bool:
    params = CLIP_METHODS.get(method, (None, {}))[1]
    p = params.get(key.strip().lower())
    return p is not None and p.kind == "bool"


# -- activation swap ---------------------------------------------------------------------------

ACTIVATIONS: dict[str, str] = {
    "relu": "ReLU",
    "relu6": "ReLU6",
    "leaky_relu": "LeakyReLU",
    "gelu": "GELU",
    "elu": "ELU",
    "selu": "SELU",
    "silu": "SiLU",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "softplus": "Softplus",
}
"""The activations a swap names, and their ``torch.nn`` classes (by name: parsing a swap option
does not import torch)."""


def activation_class(name: str) -> type[nn.Module]:
    """The ``torch.nn`` class of an activation named in :data:`ACTIVATIONS`."""
    from torch import nn

    cls: type[nn.Module] = getattr(nn, ACTIVATIONS[name])
    return cls


_SLOPED = ("leaky_relu", "elu")  # targets that take a parameter: leaky_relu:0.01, elu:1.0
_DEFAULT_SLOPE = {"leaky_relu": 0.01, "elu": 1.0}


@dataclass(frozen=True)
class SwapRule:
    """Replace modules of type ``source`` with ``target`` (``arg``: LeakyReLU slope, ELU
    alpha)."""

    source: str
    target: str
    arg: float | None = None

    @property
    def source_type(self) -> type[nn.Module]:
        return activation_class(self.source)

    def make(self, old: nn.Module | None = None) -> nn.Module:
        """A fresh target module; keeps ``inplace=True`` of the module it replaces."""
        cls = activation_class(self.target)
        kwargs: dict[str, Any] = {}
        if self.target == "leaky_relu":
            kwargs["negative_slope"] = self.arg if self.arg is not None else 0.01
        elif self.target == "elu":
            kwargs["alpha"] = self.arg if self.arg is not None else 1.0
        if getattr(old, "inplace", False) and "inplace" in cls.__init__.__code__.co_varnames:
            kwargs["inplace"] = True
        return cls(**kwargs)

    def matches(self, module: nn.Module) -> bool:
        # exact type: a LeakyReLU is not swapped by a relu rule, a subclass is the user's own
        return type(module) is self.source_type

    def __str__(self) -> str:
        arg = f":{self.arg:g}" if self.arg is not None else ""
        return f"{self.source}->{self.target}{arg}"


def parse_swap(value: Any) -> tuple[SwapRule, ...]:
    """``swap=`` as given (None, ``"relu->leaky_relu:0.01"``, several joined by ``;``, or a
    list of them) -> checked rules."""
    if value is None or value is False:
        return ()
    if isinstance(value, SwapRule):
        return (value,)
    items: list[Any]
    if isinstance(value, str):
        items = [s for s in value.split(";") if s.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise SpecError(f"swap={value!r}: expected a string such as 'relu->leaky_relu:0.01'")
    names = sorted(ACTIVATIONS)
    rules: list[SwapRule] = []
    for item in items:
        if isinstance(item, SwapRule):
            rules.append(item)
            continue
        opt = f"swap={item!r}"
        if not isinstance(item, str) or "->" not in item:
            raise SpecError(f"{opt}: expected SOURCE->TARGET[:ARG], e.g. 'relu->leaky_relu:0.01'")
        src, _, dst = (s.strip().lower() for s in item.partition("->"))
        dst, _, arg_text = dst.partition(":")
        dst = dst.strip()
        for name in (src, dst):
            if name not in ACTIVATIONS:
                raise _unknown(opt, "activation", name, names)
        if src == dst:
            raise SpecError(f"{opt}: source and target are the same activation")
        arg: float | None = None
        if arg_text.strip():
            if dst not in _SLOPED:
                raise SpecError(f"{opt}: {dst} takes no argument (only {', '.join(_SLOPED)} do)")
            arg = _coerce(
                opt,
                "slope" if dst == "leaky_relu" else "alpha",
                arg_text,
                _Param(None, "float", 0.0, low_open=True),
            )
        if any(r.source == src for r in rules):
            raise SpecError(f"{opt}: {src} is swapped twice")
        rules.append(SwapRule(src, dst, arg))
    return tuple(rules)


# -- step guard and recycling ------------------------------------------------------------------

DEFAULT_MAX_SKIPS = 10


def parse_guard(value: Any) -> int:
    """``guard=``: False/None (off), True (abort after 10 non-finite steps in a row) or the
    number of consecutive skips allowed. Returns max_skips, 0 when off."""
    if value is None or value is False or (type(value) is int and value == 0):
        return 0
    if value is True:
        return DEFAULT_MAX_SKIPS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "on", "yes"):
            return DEFAULT_MAX_SKIPS
        if text in ("false", "off", "no", "none", ""):
            return 0
        if text.isdigit() and int(text) >= 1:
            return int(text)
    raise SpecError(
        f"guard={value!r}: expected True, False, or the number of non-finite steps in a row "
        "to skip before aborting (an integer >= 0; 0 is off)"
    )


def parse_recycle(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (
        "true",
        "on",
        "yes",
        "false",
        "off",
        "no",
    ):
        return value.strip().lower() in ("true", "on", "yes")
    raise SpecError(f"recycle={value!r}: expected True or False")
