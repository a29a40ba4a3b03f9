"""The remedies that act at every optimizer step, right before the weights change: the
non-finite step guard (``guard=``) and clipping (``clip=``).

Both decide on the same per-parameter gradient norms: the ones the gradient probe measured
(unscaled, float32 or wider), plus the gradients it does not watch, in the optimizer's order; with
FSDP2 these norms are combined over the ranks first, so that every rank decides alike. The guard
reads one flag on the host (is the step finite?); clipping stays on the device
(:mod:`gradscope.remedies.clipping`). Docs: ``docs/remedies.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..events import Event
from ..probes.numerics import norms as fp32_norms
from . import NonfiniteStepsError
from .clipping import AGC, Clipper, ClipResult, make_clipper, to_device_index

if TYPE_CHECKING:
    from ..layers import LayerTable, ParamSlot
    from .spec import ClipSpec

    Measured = tuple[list[ParamSlot], list[torch.Tensor], torch.Tensor]
    """What the gradient probe measured at an optimizer step: slots, their gradients, fp32
    norms (unscaled)."""

Emit = Callable[[Event], None]


class StepGuard:
    """``guard=``: skip an optimizer step whose gradients are non-finite (the optimizer sees no
    gradient, so weights, moments and step counts stay as they were), and stop the run with
    :class:`NonfiniteStepsError` after more than ``max_skips`` such steps in a row."""

    def __init__(self, max_skips: int, event: Emit) -> None:
        self.max_skips = max_skips
        self.event = event
        self.consecutive = 0
        self.first_skip: int | None = None
        self.skips = 0
        self._stash: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def check(
        self, opt: torch.optim.Optimizer, norms: torch.Tensor, step: int, exact: bool = True
    ) -> bool:
        """Whether to skip this step (the documented host read: is the gradient finite?).

        A float32 norm of huge finite gradients overflows to inf: where a norm is not finite
        the elements decide (``exact``; not with a sharded model, whose ranks must decide
        alike from the combined norms)."""
        if bool(torch.isfinite(norms.sum())) or (
            exact and not bool(torch.isnan(norms).any()) and _grads_finite(opt)
        ):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skips += 1
        if self.consecutive == 1:
            self.first_skip = step
        if self.consecutive > self.max_skips:
            self.event(Event.remedy("guard", "abort", step, consecutive=self.consecutive))
            raise NonfiniteStepsError(
                f"gradscope guard: {self.consecutive} optimizer steps in a row had non-finite "
                f"gradients (steps {self.first_skip}-{step}); the first {self.max_skips} were "
                "skipped, training stops here (guard= sets how many in a row are allowed). "
                "See the nonfinite finding for where the NaN/Inf came from."
            )
        # An optimizer steps only parameters that have a gradient: hide them all for this step,
        # give them back after it (restore)
        stash = [(p, p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in stash:
            p.grad = None
        self._stash[id(opt)] = stash
        self.event(
            Event.remedy(
                "guard",
                "skip_step",
                step,
                consecutive=self.consecutive,
                optimizer=type(opt).__name__,
            )
        )
        return True

    def restore(self, opt: torch.optim.Optimizer) -> None:
        """Put back the gradients a skipped step hid from ``opt``."""
        stash = self._stash.pop(id(opt), None)
        if stash:
            for p, g in stash:
                p.grad = g


class StepRemedies:
    """The guard and clipping of one Scope.

    Args:
        clip: The parsed ``clip=`` option (None: off).
        max_skips: ``guard=`` (0: off).
        table: The watched layers (AGC leaves out the last layer's parameters).
        event: Writes one event (events.jsonl, TensorBoard).
        combine: With FSDP2, ``combine(params, local_norms)`` returns every parameter's norm
            over all ranks (one all-reduce per step).
    """

    def __init__(
        self,
        clip: ClipSpec | None,
        max_skips: int,
        table: LayerTable,
        event: Emit,
        combine: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.clip = clip
        self.guard = StepGuard(max_skips, event) if max_skips else None
        self.table = table
        self.event = event
        self.combine = combine
        self._clippers: dict[int, tuple[Clipper, dict[int, int], tuple[int, ...]]] = {}
        self._pending_state: list[dict[str, object]] = []  # loaded, for clippers not made yet
        self._order_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._last_layer: tuple[int, set[int]] | None = None

    @property
    def max_skips(self) -> int:
        return self.guard.max_skips if self.guard is not None else 0

    def before_step(
        self,
        opt: torch.optim.Optimizer,
        measured: Measured | None,
        grad_scale: Any,
        under_scaler: bool,
        step: int,
    ) -> tuple[bool, ClipResult | None]:
        """Guard, then clip. Returns (skip this step?, what clipping did)."""
        slots, _, norms = measured if measured is not None else ([], [], None)
        params = [
            p
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and not p.grad.is_sparse
        ]
        if not params:
            return False, None
        by_id = {id(s.param): i for i, s in enumerate(slots)}
        watched = [p for p in params if id(p) in by_id]
        extra = [p for p in params if id(p) not in by_id]
        parts = []
        if watched:
            assert norms is not None
            order = [by_id[id(p)] for p in watched]
            if order == list(range(len(slots))):
                parts.append(norms)
            else:  # the optimizer lists them in another order, or a watched sparse gradient
                parts.append(norms.index_select(0, self._index(tuple(order), norms.device)))
        if extra:
            extra_norms = fp32_norms([local(p.grad) for p in extra])
            if grad_scale is not None:
                extra_norms = extra_norms / grad_scale
            parts.append(extra_norms.to(parts[0].device) if parts else extra_norms)
        all_norms = torch.cat(parts) if len(parts) > 1 else parts[0]
        ordered = watched + extra
        if self.combine is not None:  # sharded: every rank decides on the whole gradient
            all_norms = self._combined(params, ordered, all_norms)
        # GradScaler skips a non-finite step itself (and the guard would see scaled values)
        if (
            self.guard is not None
            and not under_scaler
            and self.guard.check(opt, all_norms, step, exact=self.combine is None)
        ):
            return True, None
        if self.clip is None:
            return False, None
        grads = [local(p.grad) for p in ordered]
        result = self._clip(opt, ordered, grads, all_norms, len(watched))
        result.slots = [slots[by_id[id(p)]] for p in watched]  # the optimizer's order
        return False, result

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        if self.guard is not None:
            self.guard.restore(opt)

    def _combined(
        self, params: list[torch.Tensor], ordered: list[torch.Tensor], norms: torch.Tensor
    ) -> torch.Tensor:
        """``norms`` (of this rank's parts, in ``ordered``'s order, which depends on what this
        rank measured) over all ranks: combined in the optimizer's order, the same on every
        rank, and put back."""
        assert self.combine is not None
        pos = {id(p): i for i, p in enumerate(params)}
        idx = self._index(tuple(pos[id(p)] for p in ordered), norms.device)
        in_order = torch.empty_like(norms).index_copy_(0, idx, norms)
        return self.combine(params, in_order).index_select(0, idx)

    def _index(self, order: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``order`` as a device index, copied once per distinct order (not every step)."""
        key = (order, device)
        index = self._order_index.get(key)
        if index is None:
            if len(self._order_index) > 64:
                self._order_index.clear()
            index = self._order_index[key] = to_device_index(order, device)
        return index

    def _clip(
        self,
        opt: torch.optim.Optimizer,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        measured: int,
    ) -> ClipResult:
        assert self.clip is not None
        sig = tuple(len(g["params"]) for g in opt.param_groups)
        entry = self._clippers.get(id(opt))
        if entry is None or entry[2] != sig:
            flat = [p for g in opt.param_groups for p in g["params"]]
            index = {id(p): i for i, p in enumerate(flat)}
            entry = (make_clipper(self.clip, len(flat)), index, sig)
            self._clippers[id(opt)] = entry
            if self._pending_state:  # a checkpoint's state, in the order optimizers first step
                state = self._pending_state.pop(0)
                why = entry[0].load_state_dict(state)
                self.event(
                    Event.remedy(
                        "clip",
                        "state_restored" if why is None else "state_not_restored",
                        None,
                        **({"reason": why} if why else {}),
                    )
                )
        clipper, index, _ = entry
        if isinstance(clipper, AGC):
            last = self._last_layer_params() if self.clip["skip_last"] else set()
            skip = [id(p) in last for p in params]
            return clipper.clip_params(params, grads, norms, measured, skip)
        keys = tuple(index[id(p)] for p in params)
        return clipper.clip(grads, norms, measured, keys)

    def _last_layer_params(self) -> set[int]:
        """The last layer's parameters, recomputed only when more modules have run."""
        seen = self.table.executed_count()
        if self._last_layer is None or self._last_layer[0] != seen:
            self._last_layer = (seen, self.table.last_layer_params())
        return self._last_layer[1]

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The clippers' histories (one per optimizer, in the order they first stepped) and
        the guard's count, for a checkpoint."""
        # a loaded state whose optimizer has not stepped since is kept as loaded, in its place
        return {
            "clip": str(self.clip) if self.clip is not None else None,
            "clippers": [entry[0].state_dict() for entry in self._clippers.values()]
            + self._pending_state,
            "guard_consecutive": self.guard.consecutive if self.guard is not None else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each clipper gets its state when its optimizer first
        steps. The clip option must be the one the state was saved with."""
        if not isinstance(state, dict) or "clippers" not in state:
            raise ValueError("load_state_dict: expected the dict Scope.state_dict() returned")
        mine = str(self.clip) if self.clip is not None else None
        if state.get("clip") != mine:
            raise ValueError(
                f"load_state_dict: the state was saved with clip={state.get('clip')!r}"
                f", this scope has clip={mine!r}"
            )
        self._pending_state = list(state["clippers"])
        if self.guard is not None:
            self.guard.consecutive = int(state.get("guard_consecutive", 0))


def _grads_finite(opt: torch.optim.Optimizer) -> bool:
    """Every gradient element of ``opt`` is finite (the rare path: a norm was not)."""
    return all(
        bool(torch.isfinite(local(p.grad)).all())
        for g in opt.param_groups
        for p in g["params"]
        if p.grad is not None and not p.grad.is_sparse
    )


def local(grad: Any) -> torch.Tensor:
    """This rank's part of a gradient (a DTensor's local tensor, which clipping scales in
    place); any other gradient as is."""
    if type(grad) is torch.Tensor:
        return grad
    to_local = getattr(grad, "to_local", None)
    return to_local() if to_local is not None else grad  # type: ignore[no-any-return]
