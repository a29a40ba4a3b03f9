"""What the NaN tracer (:mod:`gradscope.probes.nonfinite`) reports: the culprit's description.

The tracer's hooks record what they saw (:class:`_FwdCall`, :class:`_GradEvent`); once a step's
checks name a culprit, these functions describe it: the phase (``forward``, ``backward``,
``optimizer``), the module and its class, and the evidence (counts of NaN/Inf, the largest
finite input, the output dtype, the non-finite parameters). Cold code, run once the culprit is
named (but for :func:`_dtype` and the records' constructors, which the hooks use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _max_abs_finite(ts: list[torch.Tensor]) -> float | None:
    best: float | None = None
    for t in ts:
        t = t.detach()
        finite = t[torch.isfinite(t)]
        if finite.numel():
            m = float(finite.abs().max())
            best = m if best is None else max(best, m)
    return best


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _summary(ts: list[torch.Tensor]) -> dict[str, int]:
    nan = sum(int(torch.isnan(t.detach()).sum()) for t in ts)
    inf = sum(int(torch.isinf(t.detach()).sum()) for t in ts)
    return {"nan": nan, "inf": inf, "elements": sum(t.numel() for t in ts)}


@dataclass
class _GradEvent:
    tensor: int  # id() of the tensor the hook sat on (alive during its backward pass)
    module: str
    cls: str
    which: str  # "in" / "out"
    bad: Any  # bool (CPU) or 0-d device bool tensor
    values: torch.Tensor | None = None  # the gradient, kept only when bad (CPU), for evidence


@dataclass
class _FwdCall:
    module: str
    cls: str
    out_bad: Any
    in_bad: Any
    mod: nn.Module | None = None
    dtype: str = ""  # of the first output: float16 non-finite from finite inputs = an overflow


def forward_info(
    step: int,
    name: str,
    module: nn.Module,
    ins: list[torch.Tensor],
    outs: list[torch.Tensor],
    first_flag_step: int | None,
) -> dict[str, Any]:
    """A module whose output is non-finite while its inputs are finite (read on the host)."""
    bad_params = [
        pname
        for pname, p in module.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())
    ]
    summary = _summary(outs)
    info: dict[str, Any] = {
        "step": step,
        "phase": "forward",
        "module": name,
        "class": type(module).__name__,
        "inputs_finite": True,
        "input_max_abs": _max_abs_finite(ins),
        "output": summary,
        "output_dtype": _dtype(outs[0]),
    }
    if info["output_dtype"] == "float16" and summary["inf"] > 0:
        info["fp16_overflow"] = True  # finite inputs, infinite float16 outputs
    elif (
        summary["inf"] > 0
        and summary["nan"] == 0
        and not any(bool((t.detach() == 0).any()) for t in ins)
    ):
        # infinite outputs from finite inputs with no exact 0 among them: not a log or a
        # division at 0 but a result beyond the dtype's range (exp, pow, a product)
        info["overflow"] = True
    if bad_params:
        info["nonfinite_params"] = bad_params[:10]
        earlier = first_flag_step is not None and first_flag_step < step
        info["phase"] = "optimizer"
        info["poisoned"] = earlier  # the weights came from an update of bad gradients
    return info


def deferred_forward_info(step: int, call: _FwdCall, first_flag_step: int | None) -> dict[str, Any]:
    """As :func:`forward_info`, from the flags read on the host at once (accelerators): no
    counts are known."""
    info: dict[str, Any] = {
        "step": step,
        "phase": "forward",
        "module": call.module,
        "class": call.cls,
        "inputs_finite": True,
        "output_dtype": call.dtype,
    }
    if call.dtype == "float16":  # only flags were read: inf or NaN is not known
        info["fp16_overflow"] = "likely"
    if call.mod is not None:
        bad_params = [
            p for p, t in call.mod.named_parameters() if not bool(torch.isfinite(t.detach()).all())
        ]
        if bad_params:
            info["phase"] = "optimizer"
            info["nonfinite_params"] = bad_params[:10]
            info["poisoned"] = first_flag_step is not None and first_flag_step < step
    return info


def bad_loss_info(step: int, loss: torch.Tensor | None) -> dict[str, Any]:
    """Every module's output was finite, the loss (or the gradient it sent back into the
    model, when the loss itself is not at hand) was not."""
    info: dict[str, Any] = {
        "step": step,
        "phase": "loss",
        "module": None,
        "class": None,
        "note": (
            "every module's output was finite: the loss computation (or code between "
            "the model and the loss: the labels, a mask) produced the non-finite value"
        ),
    }
    if loss is not None:
        info["loss"] = float(loss.detach().float().reshape(-1)[0])
    return info


def bad_data_info(step: int, module: str) -> dict[str, Any]:
    """The inputs of ``module`` were non-finite before it ran."""
    return {
        "step": step,
        "phase": "data",
        "module": None,
        "class": None,
        "before_module": module,
        "note": (
            f"the inputs of {module} were already non-finite when it ran: they came "
            "from the data or from code outside the watched modules"
        ),
    }


def backward_verdict(events: list[_GradEvent], first_bad: int, step: int) -> dict[str, Any]:
    """The culprit of a backward pass whose first non-finite gradient is ``events[first_bad]``
    (and some parameter gradient is non-finite)."""
    bad_out: set[str] = {ev.module for ev in events[:first_bad] if ev.which == "out" and ev.bad}
    # every hook on the first bad tensor: is it the input of a module whose outputs
    # received finite gradients? That module turned a finite gradient non-finite.
    key = events[first_bad].tensor
    same = [ev for ev in events[first_bad:] if ev.tensor == key and ev.bad]
    for ev in same:
        if ev.which != "in" or ev.module in bad_out:
            continue
        got_out = [o for o in events[:first_bad] if o.module == ev.module and o.which == "out"]
        if got_out:
            return backward_info(step, ev, got_out)
    ev = events[first_bad]
    outs = [e for e in same if e.which == "out"]
    producer = outs[0] if outs else ev  # the innermost module whose output this is
    info: dict[str, Any] = {
        "step": step,
        "phase": "backward",
        "module": None,
        "class": None,
        "after_module": producer.module,
        "note": (
            f"the gradient arriving at the output of {producer.module} was already "
            "non-finite: it was produced outside any module (the loss function or a "
            "functional operation applied after it)"
        ),
    }
    if ev.values is not None:
        info["gradient"] = _summary([ev.values])
    return info


def backward_info(step: int, ev: _GradEvent, outs: list[_GradEvent]) -> dict[str, Any]:
    """A module whose input gradient is non-finite while its output gradients (``outs``) were
    finite."""
    info: dict[str, Any] = {
        "step": step,
        "phase": "backward",
        "module": ev.module,
        "class": ev.cls,
        "output_grads_finite": True,
    }
    if ev.values is not None:
        info["input_grad"] = _summary([ev.values])
    return info
