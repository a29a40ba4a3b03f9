"""Remedies: what gradscope does about a pathology when asked to. All off by default.

* ``clip=``: gradient clipping right before each optimizer step (``norm``, ``autoclip``,
  ``agc``, ``zclip``; see :mod:`gradscope.remedies.clipping`). Sync-free.
* ``guard=``: skip an optimizer step whose gradients are non-finite (weights and optimizer state
  untouched), abort after too many in a row. The one remedy that reads a flag on the host at
  every step (a device sync on accelerators; benchmarks/RESULTS.md has the cost).
* ``swap=``: replace an activation module when ``dead_units`` or ``saturation`` is found on it.
* ``recycle=True``: re-initialise dead units (ReDo) when ``dead_units`` is found.

Every action is an event in ``events.jsonl`` (and a TensorBoard text entry); clipping is also in
the records (``grad_norm_clipped``, ``clip_coef``, ``clip_threshold``, ``grad_norm_total_clipped``)
and a skipped step in ``skipped_step`` / ``guard_skipped``. The finding a remedy acted on lists
the action under ``remedies``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..guard import Deliberate
from .spec import (
    ClipSpec,
    SpecError,
    SwapRule,
    parse_clip,
    parse_guard,
    parse_recycle,
    parse_swap,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..layers import LayerTable, ModuleEntry, ParamSlot
    from ..probes.activations import ModuleProbe
    from .clipping import AGC, Clipper, ClipResult, make_clipper
    from .swap import FUNCTIONAL_NOTE, replace_module, swap_activations

__all__ = [
    "ClipSpec", "NonfiniteStepsError", "Remedies", "SpecError", "SwapRule", "parse_clip",
    "parse_guard", "parse_recycle", "parse_swap", "swap_activations",
]


class NonfiniteStepsError(RuntimeError, Deliberate):
    """Raised by ``guard=`` after too many optimizer steps in a row had non-finite gradients.
    The run directory, findings and report are still written. The one exception gradscope
    raises into the training loop on purpose (see :mod:`gradscope.guard`)."""


# torch and the remedies built on it are imported on first use, so that parsing a remedy option
# (gradscope.Config, the command line's usage errors) does not import torch: the first
# Remedies() binds them into this module's namespace, where its methods find them; the public
# names among them (swap_activations...) also load on first access (__getattr__).
_TORCH_SIDE = {
    "AGC": "clipping", "ClipResult": "clipping", "Clipper": "clipping",
    "make_clipper": "clipping", "FUNCTIONAL_NOTE": "swap", "replace_module": "swap",
    "swap_activations": "swap",
}


def _bind_torch() -> None:
    """Import torch, ``nn`` and the names of :data:`_TORCH_SIDE` into this module (once)."""
    namespace = globals()
    if "torch" in namespace:
        return
    import importlib

    import torch
    from torch import nn

    for name, module in _TORCH_SIDE.items():
        namespace[name] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    namespace.update(torch=torch, nn=nn)


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        _bind_torch()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    Measured = tuple[list["ParamSlot"], list[torch.Tensor], torch.Tensor]
    """What the gradient probe measured at an optimizer step: slots, their gradients, fp32
    norms (unscaled)."""


class Remedies:
    """Applies the configured remedies for one Scope.

    Args:
        clip, swap, max_skips, recycle: The parsed options.
        table: The watched layers (names, forward order).
        probe: The activation probe (sites, unit masks; re-hooked after a swap).
        models: The watched models (parents of swapped modules).
        event: Writes one event (events.jsonl, TensorBoard).
        annotate: Adds an action to a finding's ``remedies`` list.
    """

    def __init__(
        self,
        clip: ClipSpec | None,
        swap: tuple[SwapRule, ...],
        max_skips: int,
        recycle: bool,
        table: LayerTable,
        probe: ModuleProbe,
        models: dict[str, nn.Module],
        event: Callable[[dict[str, Any]], None],
        annotate: Callable[[dict[str, Any], dict[str, Any]], None],
        patience_steps: int,
        on_replace: Callable[[nn.Module, nn.Module], None] | None = None,
    ) -> None:
        self.clip = clip
        self.swap = swap
        self.max_skips = max_skips
        self.recycle = recycle
        self.table = table
        self.probe = probe
        self.models = models
        self.event = event
        self.annotate = annotate
        self.patience_steps = patience_steps
        self.on_replace = on_replace  # others that hold the swapped module (the tracer)
        _bind_torch()
        self._clippers: dict[int, tuple[Clipper, dict[int, int], tuple[int, ...]]] = {}
        self._pending_state: list[dict[str, object]] = []  # loaded, for clippers not made yet
        self._order_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._stash: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.consecutive = 0
        self.first_skip: int | None = None
        self.skips = 0
        self._swapped: set[int] = set()  # ids of modules put in by a swap (not swapped again)
        self._handled: set[tuple[str, str, int]] = set()  # findings acted on, or refused
        self._recycled_at: dict[str, int] = {}
        self._last_layer: tuple[int, set[int]] | None = None
        self.generator = torch.Generator().manual_seed(0)
        # FSDP2 (several ranks, DTensor parameters): each rank holds a part of each gradient.
        # ``combine(params, local_norms)`` returns every parameter's norm over all ranks (one
        # all-reduce per step); the guard and the clippers then decide alike on every rank and
        # scale each rank's part (``_local``) by the same coefficient.
        self.combine: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None
        if recycle:
            probe.keep_unit_masks = True

    @property
    def at_step(self) -> bool:
        """Something to do at optimizer steps."""
        return self.clip is not None or self.max_skips > 0

    @property
    def needs_findings(self) -> bool:
        """Something to do on findings: diagnose at every sampled step, not only at flushes."""
        return bool(self.swap) or self.recycle

    def describe(self) -> dict[str, Any]:
        return {
            "clip": str(self.clip) if self.clip is not None else None,
            "guard": {"max_skips": self.max_skips} if self.max_skips else None,
            "swap": [str(r) for r in self.swap],
            "recycle": self.recycle,
        }

    def check_model(self) -> list[str]:
        """Warnings about options that can never act on this model (a swap source type with
        no module: the activations are functional)."""
        out = []
        for rule in self.swap:
            if not any(rule.matches(m) for model in self.models.values() for m in model.modules()):
                out.append(f"swap={str(rule)!r}: the model has no nn.{rule.source_type.__name__} "
                           f"module; {FUNCTIONAL_NOTE}")
        return out

    # -- at the optimizer step -------------------------------------------------------------
    def before_step(self, opt: torch.optim.Optimizer, measured: Measured | None,
                    grad_scale: Any, under_scaler: bool, step: int) -> tuple[bool, ClipResult |
                                                                              None]:
        """Guard, then clip. Returns (skip this step?, what clipping did)."""
        slots, _, norms = measured if measured is not None else ([], [], None)
        params = [p for g in opt.param_groups for p in g["params"]
                  if p.grad is not None and not p.grad.is_sparse]
        by_id = {id(s.param): i for i, s in enumerate(slots)}
        watched = [p for p in params if id(p) in by_id]
        extra = [p for p in params if id(p) not in by_id]
        if not params:
            return False, None
        from ..probes.numerics import norms as fp32_norms

        parts = []
        if watched:
            assert norms is not None
            order = [by_id[id(p)] for p in watched]
            if order == list(range(len(slots))):
                parts.append(norms)
            else:  # the optimizer lists them in another order, or a watched sparse gradient
                parts.append(norms.index_select(0, self._index(tuple(order), norms.device)))
        if extra:
            extra_norms = fp32_norms([_local(p.grad) for p in extra])
            if grad_scale is not None:
                extra_norms = extra_norms / grad_scale
            parts.append(extra_norms.to(parts[0].device) if parts else extra_norms)
        all_norms = torch.cat(parts) if len(parts) > 1 else parts[0]
        ordered = watched + extra
        if self.combine is not None:  # sharded: every rank decides on the whole gradient
            all_norms = self._combined(params, ordered, all_norms)
        if self.max_skips and not under_scaler:
            # the documented host read: is this step's gradient finite?
            if not bool(torch.isfinite(all_norms.sum())):
                self._skip(opt, step)
                return True, None
            self.consecutive = 0
        if self.clip is None:
            return False, None
        grads = [_local(p.grad) for p in ordered]
        result = self._clip(opt, ordered, grads, all_norms, len(watched))
        result.slots = [slots[by_id[id(p)]] for p in watched]  # the optimizer's order
        return False, result

    def _combined(self, params: list[torch.Tensor], ordered: list[torch.Tensor],
                  norms: torch.Tensor) -> torch.Tensor:
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
        from .clipping import to_device_index

        key = (order, device)
        index = self._order_index.get(key)
        if index is None:
            if len(self._order_index) > 64:
                self._order_index.clear()
            index = self._order_index[key] = to_device_index(order, device)
        return index

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        """Put back the gradients a skipped step hid from the optimizer."""
        stash = self._stash.pop(id(opt), None)
        if stash:
            for p, g in stash:
                p.grad = g

    def _skip(self, opt: torch.optim.Optimizer, step: int) -> None:
        self.consecutive += 1
        self.skips += 1
        if self.consecutive == 1:
            self.first_skip = step
        if self.consecutive > self.max_skips:
            self.event({"event": "remedy", "remedy": "guard", "action": "abort", "step": step,
                        "consecutive": self.consecutive})
            raise NonfiniteStepsError(
                f"gradscope guard: {self.consecutive} optimizer steps in a row had non-finite "
                f"gradients (steps {self.first_skip}-{step}); the first {self.max_skips} were "
                "skipped, training stops here (guard= sets how many in a row are allowed). "
                "See the nonfinite finding for where the NaN/Inf came from."
            )
        # An optimizer steps only parameters that have a gradient: hide them all for this step
        # (weights, moments and step counts stay exactly as they were), restore after it.
        stash = [(p, p.grad) for g in opt.param_groups for p in g["params"]
                 if p.grad is not None]
        for p, _ in stash:
            p.grad = None
        self._stash[id(opt)] = stash
        self.event({"event": "remedy", "remedy": "guard", "action": "skip_step", "step": step,
                    "consecutive": self.consecutive, "optimizer": type(opt).__name__})

    def _clip(self, opt: torch.optim.Optimizer, params: list[torch.Tensor],
              grads: list[torch.Tensor], norms: torch.Tensor, measured: int) -> ClipResult:
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
                self.event({"event": "remedy", "remedy": "clip", "step": None,
                            "action": "state_restored" if why is None else "state_not_restored",
                            **({"reason": why} if why else {})})
        clipper, index, _ = entry
        if isinstance(clipper, AGC):
            last = self._last_layer_params() if self.clip["skip_last"] else set()
            skip = [id(p) in last for p in params]
            return clipper.clip_params(params, grads, norms, measured, skip)
        keys = tuple(index[id(p)] for p in params)
        return clipper.clip(grads, norms, measured, keys)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The clippers' histories (one per optimizer, in the order they first stepped) and
        the guard's count, for a checkpoint."""
        return {
            "clip": str(self.clip) if self.clip is not None else None,
            "clippers": [entry[0].state_dict() for entry in self._clippers.values()],
            "guard_consecutive": self.consecutive,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each clipper gets its state when its optimizer first
        steps. The clip option must be the one the state was saved with."""
        if not isinstance(state, dict) or "clippers" not in state:
            raise ValueError("load_state_dict: expected the dict Scope.state_dict() returned")
        mine = str(self.clip) if self.clip is not None else None
        if state.get("clip") != mine:
            raise ValueError(f"load_state_dict: the state was saved with clip={state.get('clip')!r}"
                             f", this scope has clip={mine!r}")
        self._pending_state = list(state["clippers"])
        self.consecutive = int(state.get("guard_consecutive", 0))

    def _last_layer_params(self) -> set[int]:
        """Parameters of the last module (in forward order) that owns parameters: the
        classifier NFNets leave out of AGC (recomputed only when more modules have run)."""
        seen = self.table.executed_count()
        if self._last_layer is None or self._last_layer[0] != seen:
            self._last_layer = (seen, self._find_last_layer())
        return self._last_layer[1]

    def _find_last_layer(self) -> set[int]:
        owners = [e for e in self.table.describe() if e["kind"] == "module"]
        params_by_module: dict[str, list[ParamSlot]] = {}
        for slot in self.table.params:
            params_by_module.setdefault(slot.module_name, []).append(slot)
        for e in reversed(owners):
            if e.get("executed", True) and params_by_module.get(e["name"]):
                return {id(s.param) for s in params_by_module[e["name"]]}
        return set()

    # -- on findings -------------------------------------------------------------------------
    def on_findings(self, findings: Sequence[dict[str, Any]], step: int,
                    optimizers: Sequence[torch.optim.Optimizer]) -> None:
        for f in findings:
            if f.get("kind") not in ("dead_units", "saturation"):
                continue
            sites = [f["layer"], *f.get("evidence", {}).get("downstream_dead", [])]
            for site in sites:
                if self.swap:
                    self._maybe_swap(f, site, step)
                if self.recycle and f["kind"] == "dead_units":
                    self._maybe_recycle(f, site, step, optimizers)

    def _entry(self, site: str) -> ModuleEntry | None:
        name = site.split("#", 1)[0]
        for e in self.table.modules:
            if e.name == name:
                return e
        return None

    def _maybe_swap(self, f: dict[str, Any], site: str, step: int) -> None:
        key = ("swap", site, int(f["first_step"]))
        if key in self._handled:
            return
        self._handled.add(key)
        entry = self._entry(site)
        if entry is None:
            return
        if id(entry.module) in self._swapped:
            return  # already a swap's result: do not swap it again
        rule = next((r for r in self.swap if r.matches(entry.module)), None)
        if rule is None:
            cls = type(entry.module).__name__
            sources = ", ".join(sorted({r.source_type.__name__ for r in self.swap}))
            note = (f"swap not applied: {site} is a {cls}, not one of the swap sources "
                    f"({sources})")
            from ..layers import Family

            if entry.family is Family.OTHER:  # a user type named in activation_types
                note += f"; if {cls} calls an activation inside its forward(), " + FUNCTIONAL_NOTE
            self.annotate(f, {"remedy": "swap", "action": "not_applied", "step": step,
                              "reason": note})
            self.event({"event": "remedy", "remedy": "swap", "action": "not_applied",
                        "step": step, "layer": site, "reason": note})
            return
        old = entry.module
        new = rule.make(old)
        places = sum(replace_module(m, old, new) for m in self.models.values())
        if places == 0:
            return
        self.probe.replace(entry, new)
        if self.on_replace is not None:
            self.on_replace(old, new)
        self._swapped.add(id(new))
        record = {"remedy": "swap", "action": "swapped", "step": step, "layer": entry.name,
                  "from": type(old).__name__, "to": repr(new), "rule": str(rule),
                  "places": places}
        self.annotate(f, record)
        self.event({"event": "remedy", **record, "finding": f["kind"]})

    def _maybe_recycle(self, f: dict[str, Any], site: str, step: int,
                       optimizers: Sequence[torch.optim.Optimizer]) -> None:
        last = self._recycled_at.get(site)
        if last is not None and (f["last_step"] <= last or step - last < self.patience_steps):
            return
        dead = self.probe.dead_unit_indices(site)
        if dead is None or dead.numel() == 0:
            return
        from .recycle import make_plan, recycle

        entry = self._entry(site)
        if entry is None:
            return
        producer, between, consumer = self._neighbours(entry.name)
        units = self.probe.site_units(site)
        plan = make_plan(producer, consumer, between, units if units is not None else -1)
        self._recycled_at[site] = step
        if isinstance(plan, str):
            key = ("recycle", site, int(f["first_step"]))
            if key not in self._handled:
                self._handled.add(key)
                self.annotate(f, {"remedy": "recycle", "action": "not_applied", "step": step,
                                  "reason": plan})
                self.event({"event": "remedy", "remedy": "recycle", "action": "not_applied",
                            "step": step, "layer": site, "reason": plan})
            return
        n = recycle(plan, dead, optimizers, self.generator)
        self.probe.reset_unit_masks(site)
        record = {"remedy": "recycle", "action": "recycled", "step": step, "layer": site,
                  "units": n, "of": plan.units}
        self.annotate(f, record)
        self.event({"event": "remedy", **record})

    def _neighbours(self, name: str) -> tuple[nn.Module | None, list[nn.Module],
                                              nn.Module | None]:
        """The nearest parameterised module before ``name`` in forward order, the modules in
        between, and the nearest after it."""
        order = [e for e in self.table.describe() if e["kind"] == "module" and e["executed"]]
        names = [e["name"] for e in order]
        if name not in names:
            return None, [], None
        by_name = {e.name: e for e in self.table.modules}
        i = names.index(name)
        producer = consumer = None
        between: list[nn.Module] = []
        for n in reversed(names[:i]):
            e = by_name[n]
            if e.owns_params and e.is_leaf:
                if isinstance(e.module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                         nn.LayerNorm)):
                    between.append(e.module)
                    continue
                producer = e.module
                break
        for n in names[i + 1:]:
            e = by_name[n]
            if e.owns_params and e.is_leaf:
                consumer = e.module
                break
        return producer, between, consumer


def _local(grad: Any) -> torch.Tensor:
    """This rank's part of a gradient (a DTensor's local tensor, which clipping scales in
    place); any other gradient as is."""
    if type(grad) is torch.Tensor:
        return grad
    to_local = getattr(grad, "to_local", None)
    return to_local() if to_local is not None else grad  # type: ignore[no-any-return]

