"""Which operation made the first NaN/Inf, during a replay of the flagged step.

The NaN tracer (:mod:`gradscope.probes.nonfinite`) names a *module*. Inside a module (or in a
model's own ``forward``, where ``torch.log``, a division or a masked softmax are plain calls)
the operation that did it decides the advice: a softmax over a row that is ``-inf`` everywhere
wants a different fix from a log of a value that reached 0. While the replay of a flagged step
runs (:mod:`gradscope.probes.replay`, once per flag), an :class:`OpWatch` sees every torch
function call of the forward and keeps the first one whose result holds a NaN while its tensor
arguments hold none, or an Inf while every argument is finite. Calls that write a constant
(``masked_fill(mask, -inf)``, ``torch.full``, ``torch.where``) are not origins: an infinite mask
is how attention code is written, and the NaN it leads to is the softmax's.

Cost: nothing outside a replay (the mode is entered only around the replayed calls); during one,
a NaN and an Inf check of each result.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CONSTANT_WRITERS = frozenset(
    {
        "masked_fill",
        "masked_fill_",
        "fill",
        "fill_",
        "full",
        "full_like",
        "new_full",
        "where",
        "index_fill",
        "index_fill_",
        "masked_scatter",
        "masked_scatter_",
        "tensor",
        "as_tensor",
        "__setitem__",
    }
)
_SOFTMAX = frozenset({"softmax", "log_softmax", "softmin", "_softmax"})
_LOGS = frozenset({"log", "log_", "log2", "log10", "log1p", "xlogy"})
_ROOTS = frozenset({"sqrt", "sqrt_", "rsqrt", "pow", "pow_", "__pow__", "float_power"})
_DIVS = frozenset({"div", "div_", "__truediv__", "__rtruediv__", "true_divide", "reciprocal"})
_EXPS = frozenset({"exp", "exp_", "exp2", "expm1", "sinh", "cosh", "__mul__", "mul", "matmul"})
_TRIG = frozenset({"acos", "asin", "arccos", "arcsin", "atanh", "acosh"})


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _name(func: Any) -> str:
    """``torch.log``, ``F.softmax``, ``Tensor.masked_fill``... as a user would write it."""
    short = getattr(func, "__name__", None) or str(func)
    qual = getattr(func, "__qualname__", "") or ""
    module = getattr(func, "__module__", "") or ""
    if "Tensor" in qual.split(".")[0]:
        return f"Tensor.{short}"
    if module.startswith("torch.nn.functional"):
        return f"F.{short}"
    return f"torch.{short}"


def _floats(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in ts if t.is_floating_point() or t.is_complex()]


def _has_nan(ts: list[torch.Tensor]) -> bool:
    return any(bool(torch.isnan(t).any()) for t in ts)


def _finite(ts: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


class OpWatch(TorchFunctionMode):
    """A torch-function mode that keeps the first call that made a NaN or an Inf.

    Attributes:
        first: ``{"op", "why", "cause", "made"}`` of the first call that made a non-finite
            value from finite arguments (the origin: ``log(0) = -inf``, ``0 / 0``, an ``exp``
            that overflows), else of the first that made a NaN from arguments without one (a
            softmax over a row that an infinite mask filled), or None.
    """

    def __init__(self) -> None:
        super().__init__()
        self._origin: dict[str, Any] | None = None
        self._nan: dict[str, Any] | None = None

    @property
    def first(self) -> dict[str, Any] | None:
        return self._origin or self._nan

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._origin is None:
            with contextlib.suppress(Exception):  # never change or stop the replayed call
                self._check(func, args, kwargs, out)
        return out

    def _check(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        short = getattr(func, "__name__", "")
        if short in _CONSTANT_WRITERS:
            return
        outs = _floats(_tensors(out))
        if not outs or _finite(outs):
            return
        ins = _floats(_tensors(args) + _tensors(kwargs))
        if _finite(ins):
            self._origin = _describe(func, short, ins, nan=_has_nan(outs))
        elif self._nan is None and _has_nan(outs) and not _has_nan(ins):
            self._nan = _describe(func, short, ins, nan=True)


def _describe(func: Any, short: str, ins: list[torch.Tensor], nan: bool) -> dict[str, Any]:
    """What the call did, and the cause that decides the advice."""
    name = _name(func)
    made = "NaN" if nan else "Inf"
    x = ins[0] if ins else None
    cause = "other"
    why = f"made {made} from inputs without {'NaN' if nan else 'NaN or Inf'}"
    if x is not None and short in _SOFTMAX and bool(torch.isinf(x).any()):
        dim = -1 if x.dim() else 0
        rows = int(torch.isneginf(x).all(dim=dim).sum()) if x.dim() else 1
        if rows:
            cause = "masked_row"
            why = f"ran over {rows} row(s) that are -inf everywhere (every position masked)"
    elif x is not None and short in _LOGS:
        low = float(x.detach().min())
        cause = "log_domain"
        why = f"of values down to {low:.3g} (the log needs positive values)"
    elif x is not None and short in _ROOTS and bool((x < 0).any()):
        cause = "root_domain"
        why = f"of negative values (down to {float(x.detach().min()):.3g})"
    elif short in _DIVS and len(ins) >= 2 and bool((ins[1] == 0).any()):
        cause = "divide_by_zero"
        why = f"by {int((ins[1] == 0).sum())} denominator value(s) equal to 0"
    elif short in ("reciprocal", "rsqrt") and x is not None and bool((x == 0).any()):
        cause = "divide_by_zero"
        why = f"of {int((x == 0).sum())} value(s) equal to 0"
    elif short in _TRIG and x is not None:
        cause = "trig_domain"
        why = f"of values outside its domain (|x| up to {float(x.detach().abs().max()):.3g})"
    elif not nan and ins and _finite(ins):
        top = max(float(t.detach().abs().max()) for t in ins if t.numel())
        cause = "overflow"
        dtype = str(ins[0].dtype).replace("torch.", "")
        why = f"overflowed: finite inputs up to {top:.3g} gave values beyond the {dtype} range"
    elif nan and ins and not _finite(ins):
        cause = "inf_arithmetic"
        why = "combined infinite inputs into NaN (inf - inf, 0 * inf)"
    return {"op": name, "why": why, "cause": cause, "made": made}
