"""NaN/Inf anywhere in the records: the loss, activations, gradients or weights.

The records say *when* and roughly *where*; the tracer (``gradscope.probes.nonfinite``) says
which module produced the first value. This rule is what remains when the tracer did not run
(``trace_nonfinite="off"``, or a one-off NaN that ``"auto"`` armed too late for): the phase is
inferred from what was non-finite at the first bad step (a non-finite loss or activation: the
forward pass; finite loss, non-finite gradients: the backward pass; only weights: the update).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..records import RUN_LAYER
from .advice import lower_lr, option, setting
from .base import Episode, Records, runs

TRACE_HINT = (
    f"run with {setting('trace_nonfinite', 'always')} to name the module at the first occurrence"
)
GUARD = option("guard", True)


def _bad(values: np.ndarray, count_metric: bool) -> np.ndarray:
    """``[T, L]`` mask of non-finite observations: a count > 0, or an infinite value (the
    engine stores a recorded NaN as +inf, because NaN in a wide table means "not recorded")."""
    with np.errstate(invalid="ignore"):
        return values > 0 if count_metric else np.isinf(values)


def nonfinite(rec: Records, t: Any = None) -> list[Episode]:
    """One episode covering the window's non-finite steps, with the inferred phase and layer."""
    per_step: dict[int, dict[str, list[str]]] = {}

    def mark(metric: str, kind: str, what: str, count_metric: bool) -> None:
        steps, names, v = rec.wide(metric, kind)
        if not steps.size:
            return
        for i, j in zip(*np.nonzero(_bad(v, count_metric))):
            per_step.setdefault(int(steps[i]), {}).setdefault(what, []).append(names[j])

    mark("loss", "run", "loss", False)
    mark("act_nonfinite", "module", "activations", True)
    mark("grad_nonfinite", "param", "gradients", True)
    mark("weight_nonfinite", "param", "weights", True)
    # a weight norm is NaN when a weight is; infinite also when the float32 norm of huge finite
    # weights overflows: where the elements were counted (the CPU), the counts decide
    w_steps, w_names, w_norms = rec.wide("weight_norm", "param")
    if w_steps.size:
        w_counts = rec.aligned("weight_nonfinite", "param", w_steps, w_names)
        with np.errstate(invalid="ignore"):
            bad_w = np.isnan(w_norms) | (np.isinf(w_norms) & np.isnan(w_counts))
        for i, j in zip(*np.nonzero(bad_w)):
            per_step.setdefault(int(w_steps[i]), {}).setdefault("weights", []).append(w_names[j])
    steps, names, norms = rec.wide("grad_norm", "param")
    if steps.size:  # accelerators count only flagged steps: an uncounted infinite norm
        counts = rec.aligned("grad_nonfinite", "param", steps, names)
        for i, j in zip(*np.nonzero(np.isinf(norms) & np.isnan(counts))):
            per_step.setdefault(int(steps[i]), {}).setdefault("gradients", []).append(names[j])
    scaler_ok = _handled_by_scaler(rec)
    for step in [s for s in per_step if s in scaler_ok and "loss" not in per_step[s]]:
        del per_step[step]
    if not per_step:
        return []
    bad_steps = sorted(per_step)
    if bad_steps[-1] < rec.since:
        return []
    first = bad_steps[0]
    what = per_step[first]
    rank = rec.layers.rank
    big = len(rank) + 1
    module: str | None = None
    if "loss" in what or "activations" in what:
        phase = "forward"
        sites = sorted(what.get("activations", []), key=lambda n: rank.get(n, big))
        layer = sites[0].split("#", 1)[0] if sites else RUN_LAYER
    elif "gradients" in what:
        phase = "backward"
        params = sorted(what["gradients"], key=lambda n: rank.get(n, big))
        layer = rec.layers.module_of.get(params[-1], params[-1])  # nearest the loss
    else:
        phase = "optimizer"
        params = sorted(what.get("weights", []), key=lambda n: rank.get(n, big))
        layer = rec.layers.module_of.get(params[0], params[0])
    g_steps, _, guard = rec.wide("guard_skipped", "run")
    guarded = int((guard[:, 0] > 0).sum()) if g_steps.size else 0
    ev: dict[str, Any] = {
        "nonfinite_steps": len(bad_steps),
        "skipped_by_guard": guarded,
        "first_in": sorted(what),
        "params_with_nonfinite_grads": sorted(set(what.get("gradients", [])))[:20],
        "sites_with_nonfinite_outputs": sorted(set(what.get("activations", [])))[:20],
        "traced": False,
    }
    where = "in the loss" if layer == RUN_LAYER else f"at {layer}"
    # no counts in the message: they grow as the finding extends (evidence.nonfinite_steps,
    # skipped_by_guard), and a message must not contradict its own evidence and step range
    msg = (
        f"non-finite values (NaN/Inf) first appeared in the {phase} pass at step {first}, "
        f"{where} (first seen in: {', '.join(sorted(what))})"
    )
    hint = phase_hint(phase, None, lower_lr(rec.context)) + "; " + TRACE_HINT
    return [
        Episode(
            "nonfinite",
            layer,
            first,
            bad_steps[-1],
            "error",
            ev,
            msg,
            hint,
            {"phase": phase, "module": module, "class": None},
        )
    ]


def traced_episode(info: dict[str, Any]) -> Episode:
    """The episode for a verdict of the tracer (``gradscope.probes.nonfinite``): the module,
    its class and the phase, with the tracer's evidence. A module whose weights were poisoned by
    an earlier bad update is not an origin (``traced`` stays False, so an earlier inference
    keeps precedence)."""
    step = int(info["step"])
    phase = str(info["phase"])
    module = info.get("module")
    cls = info.get("class")
    poisoned = bool(info.get("poisoned"))
    evidence = {k: v for k, v in info.items() if k not in ("step", "phase", "module", "class")}
    evidence["traced"] = not poisoned
    evidence["traced_at_step"] = step
    layer = module or info.get("after_module") or info.get("before_module") or RUN_LAYER
    on_rank = f" (on rank {info['rank']})" if "rank" in info else ""  # torch.distributed
    hint = None  # advice for a cause more specific than the phase
    if poisoned:
        msg = (
            f"weights of {module} ({cls}) are non-finite at step {step}: an earlier "
            "update applied non-finite gradients"
        )
        # where the NaN shows, not where it was born: advice about the optimizer (a lower
        # learning rate, Adam's eps) would send the user the wrong way
        hint = POISONED_HINT
    elif module is None and phase == "data":
        msg = f"the data held non-finite values at step {step}: {info.get('note', '')}"
    elif module is None and phase == "loss" and _huge(info.get("output_max_abs")):
        msg = (
            f"the loss overflowed at step {step}: the model's outputs were finite but reached "
            f"{info['output_max_abs']:.3g}, whose square (or exp) leaves the float32 range: "
            "the training diverged before this step"
        )
        hint = DIVERGED_HINT
    elif module is None and phase == "loss":
        msg = f"the loss made the first non-finite value at step {step}: {info.get('note', '')}"
    elif module is None:
        msg = f"non-finite values at step {step} ({phase} pass): {info.get('note', '')}"
    elif phase == "forward" and evidence.get("fp16_overflow"):
        msg = (
            f"{module} ({cls}) produced the first non-finite output at step {step}: its "
            "float16 output left the float16 range (|x| > 65504) although its inputs were "
            "finite"
            + (
                " (most likely: only NaN/Inf flags were read on the device)"
                if evidence["fp16_overflow"] == "likely"
                else ""
            )
        )
        hint = FP16_HINT.format(module=module)
    elif phase == "forward" and evidence.get("overflow"):
        msg = (
            f"{module} ({cls}) produced the first non-finite output at step {step}: an "
            f"overflow, infinite values from finite inputs (largest |input| "
            f"{evidence.get('input_max_abs', float('nan')):.3g}) beyond the "
            f"{evidence.get('output_dtype', 'float32')} range"
        )
        hint = OVERFLOW_HINT.format(module=module)
    elif phase == "forward" and isinstance(evidence.get("op"), dict):
        op = evidence["op"]
        msg = (
            f"{module} ({cls}) produced the first non-finite output at step {step}, from "
            f"finite inputs: {op.get('op')} {op.get('why')}"
        )
        hint = OP_HINTS.get(str(op.get("cause")))
    elif phase == "forward":
        msg = (
            f"{module} ({cls}) produced the first non-finite output at step {step}, "
            "from finite inputs"
        )
    elif phase == "backward":
        msg = (
            f"{module} ({cls}) produced the first non-finite gradient at step {step} "
            "(backward pass): the gradients arriving at its output were finite"
        )
    else:
        msg = (
            f"weights of {module} ({cls}) became non-finite in the optimizer step before "
            f"step {step}, while the gradients were finite"
        )
    return Episode(
        "nonfinite",
        layer,
        step,
        step,
        "error",
        evidence,
        msg + on_rank,
        hint or phase_hint(phase, module),
        {"phase": phase, "module": module, "class": cls},
    )


OP_HINTS = {
    "masked_row": (
        "every position of some row is masked (-inf), and a softmax over nothing is NaN: make "
        "sure each query keeps at least one position it may attend to (a padding query whose "
        "keys are all masked, a causal mask combined with a padding mask), or fill the mask "
        "with torch.finfo(scores.dtype).min instead of -inf so such a row is uniform, not NaN"
    ),
    "log_domain": (
        "keep the argument of the log positive: torch.log(x.clamp_min(1e-8)), or compute in "
        "log space from logits (F.log_softmax, F.logsigmoid, nn.BCEWithLogitsLoss instead of "
        "log(softmax(...)) or log(sigmoid(...)))"
    ),
    "root_domain": (
        "keep the argument non-negative (x.clamp_min(0)) and away from 0 where it is "
        "differentiated: torch.sqrt(x + 1e-12); sqrt'(0) is infinite"
    ),
    "divide_by_zero": (
        "add an epsilon to the denominator (x / (d + 1e-8)) or clamp it (d.clamp_min(1e-8)): "
        "a norm or standard deviation of a constant input is exactly 0"
    ),
    "trig_domain": (
        "clamp the argument into the function's domain (x.clamp(-1 + 1e-7, 1 - 1e-7) for acos/asin)"
    ),
    "overflow": (
        "compute in log space or subtract the maximum before exponentiating "
        "(torch.logsumexp, F.log_softmax), clamp the argument, or lower the learning rate "
        "if the inputs grew during training"
    ),
}
"""Advice for the operation that made the first NaN/Inf in a replayed forward
(:mod:`gradscope.probes.ops`), by its cause."""

POISONED_HINT = (
    "these weights carry a NaN/Inf an earlier step's gradients put there: look for where the "
    f"non-finite values were first recorded (this finding's first step); {GUARD} skips "
    "non-finite steps so the weights stay clean and the tracer names the origin when it "
    f"recurs, and {setting('trace_nonfinite', 'always')} names it at once"
)
DIVERGED_HINT = (
    "the training diverged: lower the learning rate (or add warm-up), and look at the "
    "exploding_gradients or update_ratio_high finding for where it started; clipping or "
    "guarding the loss would only hide it"
)


def _huge(value: Any) -> bool:
    """Finite model outputs large enough that a loss over them overflows float32 (a square
    above ~1.8e19, an exp above ~88)."""
    return isinstance(value, (int, float)) and 1e15 < value < float("inf")


OVERFLOW_HINT = (
    "keep the input of {module} in range: an exp or a power of a large input overflows "
    "(use the stable form: logsumexp, softplus, log_softmax, or clamp the input, e.g. "
    "torch.exp(x.clamp_max(80))); if its inputs grew over training, lower the learning rate or "
    "normalise them (a LayerNorm before it)"
)
FP16_HINT = (
    "a float16 overflow under autocast: autocast to bfloat16 instead (float32's range), "
    "or keep {module} in float32 (run it under torch.autocast(..., enabled=False) with "
    "float32 inputs), or normalise its input (a LayerNorm before it) or scale its "
    "weights down; GradScaler only skips such steps, it cannot fix a forward overflow"
)


def phase_hint(phase: str, module: str | None, lower: str = "lower the learning rate") -> str:
    """What to try for a non-finite value born in ``phase`` (in ``module`` when known;
    ``lower``: the advice to lower the learning rate, with the run's optimizer when known)."""
    where = f" in {module}" if module else ""
    if phase == "forward":
        return (
            f"guard the operation that produced it{where}: clamp before log/sqrt/division "
            "(torch.log(x.clamp_min(1e-12))), use log_softmax/logsumexp instead of "
            f"log(softmax); check the inputs for NaN; meanwhile {GUARD} skips the steps "
            "whose gradients are non-finite"
        )
    if phase == "data":
        return (
            "check the data: torch.isfinite(batch).all() on each batch, missing values in "
            "the dataset, a division in the preprocessing (normalising by a zero std); "
            f"meanwhile {GUARD} skips the steps whose gradients are non-finite"
        )
    if phase == "loss":
        return (
            "check the loss: the labels (NaN or out of range), log of a probability of 0 "
            "(use cross_entropy or BCEWithLogitsLoss on logits, log_softmax instead of "
            f"log(softmax)), a mean over an empty mask; meanwhile {GUARD} skips the steps "
            "whose gradients are non-finite"
        )
    if phase == "backward":
        return (
            f"an operation{where} has an infinite derivative at its input (sqrt or "
            "pow < 1 at 0, log at 0, division by a small number): add an epsilon inside it "
            f"(torch.sqrt(x + 1e-12)); meanwhile {GUARD} skips the steps whose gradients are "
            "non-finite"
        )
    return (
        f"the update made weights non-finite: {lower}, clip gradients, check the optimizer's "
        f"eps (Adam eps=0 divides by zero); {GUARD} skips steps with non-finite gradients"
    )


AMP_SKIPS = 20
"""Consecutive GradScaler-skipped steps that are still the scaler calibrating: each skip halves
the scale, and 2^16 / 2^20 is below any useful fp16 loss scale. More is a real problem."""


def _handled_by_scaler(rec: Records) -> set[int]:
    """Steps GradScaler skipped (gradients overflowed at the current scale; it halved the scale
    and left the weights alone), in runs shorter than ``AMP_SKIPS``: expected behaviour of
    mixed precision, not a finding."""
    steps, _, skipped = rec.wide("skipped_step", "run")
    if not steps.size:
        return set()
    by_scaler = skipped[:, 0] > 0
    g_steps, _, guard = rec.wide("guard_skipped", "run")
    if g_steps.size:  # skipped by gradscope's guard, not by a GradScaler
        by_scaler &= ~np.isin(steps, g_steps[guard[:, 0] > 0])
    return {
        int(s) for a, b in runs(by_scaler, 1) if b - a + 1 < AMP_SKIPS for s in steps[a : b + 1]
    }
