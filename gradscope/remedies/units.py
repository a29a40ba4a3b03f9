"""The remedies that act on findings: swapping an activation module (``swap=``) and
re-initialising dead units (``recycle=True``), on ``dead_units`` and ``saturation`` findings.

They do not edit findings: :meth:`UnitRemedies.on_findings` returns one :class:`Action` per thing
done (or refused), and the diagnoser attaches each to its finding's ``remedies`` list. Each
action is also an event. Docs: ``docs/remedies.md`` (Activation swap, Dead-unit recycling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..events import Event, Finding, RemedyAction
from ..layers import Family
from .recycle import make_plan, recycle
from .swap import FUNCTIONAL_NOTE, replace_module

if TYPE_CHECKING:
    from ..layers import LayerTable, ModuleEntry
    from ..probes.activations import ModuleProbe
    from .spec import SwapRule

ACTS_ON = ("dead_units", "saturation")
"""The finding kinds these remedies act on."""
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


class Action(NamedTuple):
    """A remedy's action on one finding: the finding it answers (as returned by the
    diagnoser) and what was done."""

    finding: Finding
    record: RemedyAction


class UnitRemedies:
    """Swap and recycle for one Scope.

    Args:
        swap: The parsed ``swap=`` rules (empty: off).
        recycle: ``recycle=True``.
        table: The watched layers (names, forward order, neighbours of a unit).
        probe: The activation probe (sites, unit masks; re-hooked after a swap).
        models: The watched models (parents of swapped modules).
        event: Writes one event (events.jsonl, TensorBoard).
        patience_steps: Steps between two recyclings of one site.
        on_replace: Told of each swap (others that hold the module: the tracer).
    """

    def __init__(
        self,
        swap: tuple[SwapRule, ...],
        recycle: bool,
        table: LayerTable,
        probe: ModuleProbe,
        models: dict[str, nn.Module],
        event: Callable[[Event], None],
        patience_steps: int,
        on_replace: Callable[[nn.Module, nn.Module], None] | None = None,
    ) -> None:
        self.swap = swap
        self.recycle = recycle
        self.table = table
        self.probe = probe
        self.models = models
        self.event = event
        self.patience_steps = patience_steps
        self.on_replace = on_replace
        self.generator = torch.Generator().manual_seed(0)
        self._swapped: set[int] = set()  # ids of modules put in by a swap (not swapped again)
        self._handled: set[tuple[str, str, int]] = set()  # findings acted on, or refused
        self._recycled_at: dict[str, int] = {}
        self.swapped: dict[str, tuple[int, str, str]] = {}  # site -> (step, from, to) done
        if recycle:
            probe.keep_unit_masks = True

    def check_model(self) -> list[str]:
        """Why a swap rule can never act on this model (no module of its source type: the
        activations are functional)."""
        out = []
        for rule in self.swap:
            if not any(rule.matches(m) for model in self.models.values() for m in model.modules()):
                out.append(
                    f"swap={str(rule)!r}: the model has no nn.{rule.source_type.__name__} "
                    f"module; {FUNCTIONAL_NOTE}"
                )
        return out

    def on_findings(
        self, findings: Sequence[Finding], step: int, optimizers: Sequence[torch.optim.Optimizer]
    ) -> list[Action]:
        """Act on the findings this remedy answers; returns what was done, finding by
        finding (each also an event)."""
        actions: list[Action] = []
        for f in findings:
            if f.get("kind") not in ACTS_ON:
                continue
            # every layer of a grouped finding, and the dead cascade below it
            sites = list(
                dict.fromkeys(
                    [
                        f["layer"],
                        *f.get("layers", []),
                        *f.get("evidence", {}).get("downstream_dead", []),
                    ]
                )
            )
            for site in sites:
                record = None
                if self.swap:
                    record = self._swap(f, site, step)
                    if record is not None:
                        actions.append(Action(f, record))
                if self.recycle and f["kind"] == "dead_units":
                    record = self._recycle(f, site, step, optimizers)
                    if record is not None:
                        actions.append(Action(f, record))
        return actions

    def _swap(self, f: Finding, site: str, step: int) -> RemedyAction | None:
        key = ("swap", site, int(f["first_step"]))
        if key in self._handled:
            return None
        self._handled.add(key)
        entry = self.table.entry(site)
        called = self.table.functional_site(site)
        if entry is None and called is not None:  # F.relu(...) inside forward(): no module
            return self._refused(
                "swap",
                site,
                step,
                f"swap not applied: {site} is {called.label}() called inside forward(), "
                f"not a module; edit the code instead ({FUNCTIONAL_NOTE})",
            )
        if entry is None or id(entry.module) in self._swapped:
            return None  # not watched, or already a swap's result: not swapped again
        rule = next((r for r in self.swap if r.matches(entry.module)), None)
        if rule is None:
            return self._refused("swap", site, step, self._why_not_swapped(entry, site))
        old = entry.module
        new = rule.make(old)
        places = sum(replace_module(m, old, new) for m in self.models.values())
        if places == 0:
            return None
        self.probe.replace(entry, new)
        if self.on_replace is not None:
            self.on_replace(old, new)
        self._swapped.add(id(new))
        self.swapped[entry.name] = (step, type(old).__name__, type(new).__name__)
        record: RemedyAction = {
            "remedy": "swap",
            "action": "swapped",
            "step": step,
            "layer": entry.name,
            "from": type(old).__name__,
            "to": repr(new),
            "rule": str(rule),
            "places": places,
        }
        self.event(Event.remedy(**record, finding=f["kind"]))
        return record

    def _why_not_swapped(self, entry: ModuleEntry, site: str) -> str:
        cls = type(entry.module).__name__
        sources = ", ".join(sorted({r.source_type.__name__ for r in self.swap}))
        note = f"swap not applied: {site} is a {cls}, not one of the swap sources ({sources})"
        if entry.family is Family.OTHER:  # a user type named in activation_types
            note += f"; if {cls} calls an activation inside its forward(), " + FUNCTIONAL_NOTE
        return note

    def _recycle(
        self, f: Finding, site: str, step: int, optimizers: Sequence[torch.optim.Optimizer]
    ) -> RemedyAction | None:
        last = self._recycled_at.get(site)
        if last is not None and (f["last_step"] <= last or step - last < self.patience_steps):
            return None
        dead = self.probe.dead_unit_indices(site)
        if dead is None or dead.numel() == 0:
            return None
        entry = self.table.entry(site)
        called = self.table.functional_site(site)
        if entry is None and called is not None and called.anchor is not None:
            producer, between, consumer = self._around_anchor(called.anchor)
        elif entry is None:
            return None
        else:
            producer, between, consumer = self.table.neighbours(entry.name, passthrough=_NORMS)
        units = self.probe.site_units(site)
        plan = make_plan(producer, consumer, between, units if units is not None else -1)
        self._recycled_at[site] = step
        if isinstance(plan, str):
            key = ("recycle", site, int(f["first_step"]))
            if key in self._handled:
                return None
            self._handled.add(key)
            return self._refused("recycle", site, step, plan)
        n = recycle(plan, dead, optimizers, self.generator)
        self.probe.reset_unit_masks(site)
        record: RemedyAction = {
            "remedy": "recycle",
            "action": "recycled",
            "step": step,
            "layer": site,
            "units": n,
            "of": plan.units,
        }
        self.event(Event.remedy(**record))
        return record

    def _around_anchor(
        self, anchor: str
    ) -> tuple[nn.Module | None, list[nn.Module], nn.Module | None]:
        """A functional activation's neighbours: it reads ``anchor``'s output (the layer, or a
        norm right after it), and the next layer with parameters reads it."""
        entry = self.table.entry(anchor)
        before, between, consumer = self.table.neighbours(anchor, passthrough=_NORMS)
        if entry is None or not isinstance(entry.module, _NORMS):
            return (entry.module if entry is not None else None), [], consumer
        return before, [*between, entry.module], consumer

    def _refused(self, remedy: str, site: str, step: int, reason: str) -> RemedyAction:
        self.event(Event.remedy(remedy, "not_applied", step, layer=site, reason=reason))
        return {"remedy": remedy, "action": "not_applied", "step": step, "reason": reason}
