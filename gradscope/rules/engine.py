"""The Diagnoser: runs the rules at every flush and keeps the findings.

Rules are pure; this is where state lives. It keeps a window of recent records (host numbers),
the first value of every column, and the findings. An episode whose kind and layer match an
open finding that ended at most ``merge_gap`` steps earlier *extends* it (``last_step`` moves,
the evidence is updated), so a condition that lasts 10,000 steps is one finding, not 10,000.
A new finding is announced once (stderr line, ``events.jsonl``); ``findings.json`` is written at
the end by the Scope.

A rule that raises is a bug in gradscope, not in the user's training: it is logged as an event
and skipped; the other rules still run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from ..events import Finding, RemedyAction
from ..records import ROOT, RUN_LAYER, LongTable
from .advice import RunContext, render, setting
from .base import Episode, LayerInfo, Records
from .gradients import exploding_gradients, vanishing_gradients
from .loss import loss_spike
from .nonfinite import nonfinite
from .thresholds import Thresholds
from .units import dead_units, saturation
from .updates import update_ratio

Rule = Callable[[Records, Thresholds], list[Episode]]
RULES: tuple[Rule, ...] = (
    nonfinite,
    exploding_gradients,
    vanishing_gradients,
    dead_units,
    saturation,
    update_ratio,
    loss_spike,
)
FINDING_KINDS = (
    "exploding_gradients",
    "vanishing_gradients",
    "nonfinite",
    "dead_units",
    "saturation",
    "update_ratio_high",
    "update_ratio_low",
    "loss_spike",
)
RULE_METRICS = frozenset(
    {
        "grad_norm",
        "grad_nonfinite",
        "weight_nonfinite",
        "weight_norm",
        "update_ratio",
        "act_dead_fraction",
        "act_saturation",
        "act_nonfinite",
        "output_grad_norm",
        "loss",
        "grad_norm_total",
        "skipped_step",
        "guard_skipped",
        "grad_norm_total_clipped",
        "lr",
        "_n",
        "_units",
    }
)
"""What the rules read; the Diagnoser's window keeps only these."""
FINDING_REMEDY_RULES: tuple[Rule, ...] = (dead_units, saturation)
"""The rules whose findings the swap and recycle remedies act on: run at every sample while
those remedies are on (the others wait for the flush)."""
# evidence that describes the start of a finding: kept when the finding is extended
_STICKY = ("born_dead", "since_step", "at_first_check", "first_in", "traced")
# the measure of how bad an episode was, and the numbers that belong to its peak
_PEAKS = ("peak_ratio", "peak_dead_fraction", "peak_saturated_fraction")
_AT_PEAK = ("median_norm", "robust_z", "post_clip_norm")

_OWN_CAUSES = frozenset({"after_swap"})
"""Causes whose episodes never extend a finding of another cause on the same layer."""

Announce = Callable[[Finding, bool], None]


def finding_from(ep: Episode, context: RunContext | None = None) -> Finding:
    """The JSON shape of a finding (docs/run-directory.md, "findings.json"): kind, severity,
    layer (the primary one), layers (all of them), steps, evidence, message, suggestion;
    ``nonfinite`` adds phase, module and class. The options named in the message and the
    suggestion are spelled for the run's launcher (:func:`~gradscope.rules.advice.render`)."""
    out: dict[str, Any] = {  # a Finding (typed where it is read)
        "kind": ep.kind,
        "severity": ep.severity,
        "layer": ep.layer,
        "layers": list(dict.fromkeys([ep.layer, *ep.layers])),
        "first_step": ep.first_step,
        "last_step": ep.last_step,
        "evidence": _jsonable(ep.evidence),
        "message": render(ep.message, context),
        "suggestion": render(ep.suggestion, context),
    }
    out.update(_jsonable(ep.extra))
    return cast("Finding", out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if np.isfinite(f) else str(f)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class Diagnoser:
    """Turns flushed records into findings.

    Args:
        thresholds: The rules' thresholds.
        announce: Called with ``(finding, new)`` when a finding is raised (``new=True``) or
            gains information worth telling (the tracer named the module: ``new=False``).
        sample_every: Steps between two activation/update checks (sizes the window).
        rules: The rules to run (default: all of :data:`RULES`).
    """

    def __init__(
        self,
        thresholds: Thresholds,
        announce: Announce,
        sample_every: int = 10,
        rules: tuple[Rule, ...] = RULES,
    ) -> None:
        self.t = thresholds
        self.announce = announce
        self.rules = rules
        self.keep_steps = max(
            1000, (thresholds.history + 2 * thresholds.patience + 2) * max(sample_every, 1)
        )
        self.findings: list[Finding] = []
        self.errors: list[str] = []
        self.context = RunContext()
        self._open: dict[tuple[str, str, str], Finding] = {}  # (kind, layer, cause)
        self._cause: dict[int, str] = {}  # id(finding) -> the cause its layers share
        self._notes: dict[int, str] = {}  # id(finding) -> the remedy note ending its message
        self._columns: list[tuple[str, str, str]] = []
        self._cid: dict[tuple[str, str, str], int] = {}
        self._step = np.zeros(0, dtype=np.int64)
        self._col = np.zeros(0, dtype=np.int64)
        self._value = np.zeros(0)
        self._first: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._nonfinite: Finding | None = None
        self._pending: dict[Rule, int] = {}  # rule -> first step it has not evaluated yet

    # -- records ----------------------------------------------------------------------------------
    def update(
        self,
        table: LongTable,
        layers: LayerInfo,
        rules: tuple[Rule, ...] | None = None,
        context: RunContext | None = None,
    ) -> list[Finding]:
        """Add a flushed table and run the rules (default: all) on the window; returns new
        findings. A rule left out now sees these steps as new the next time it runs.
        ``context``: what is known about the run now (advice is built from it)."""
        if context is not None:
            self.context = context
        if not len(table):
            return []
        since = int(table.step.min())
        for rule in self.rules:
            self._pending[rule] = min(self._pending.get(rule, since), since)
        used = np.array([c[2] in RULE_METRICS for c in table.columns] + [False], dtype=bool)
        keep_rows = used[table.col]  # only what some rule reads is kept in the window
        remap = np.array(
            [self._column(c) if used[i] else -1 for i, c in enumerate(table.columns)],
            dtype=np.int64,
        )
        steps = table.step[keep_rows]
        cid = remap[table.col[keep_rows]]
        value = table.value[keep_rows]
        value = np.where(np.isnan(value), np.inf, value)  # NaN = "not recorded" in wide tables
        if not steps.size:
            return []
        new_cols = [c for c in np.unique(cid).tolist() if self._columns[c] not in self._first]
        if new_cols:
            order = np.argsort(steps, kind="stable")
            first_row: dict[int, int] = {}
            for r in order[np.isin(cid[order], new_cols)].tolist():
                first_row.setdefault(int(cid[r]), r)
            for c, r in first_row.items():
                self._first[self._columns[c]] = (int(steps[r]), float(value[r]))
        self._step = np.concatenate([self._step, steps])
        self._col = np.concatenate([self._col, cid])
        self._value = np.concatenate([self._value, value])
        keep = self._step > int(self._step.max()) - self.keep_steps
        if not keep.all():
            self._step, self._col, self._value = (
                self._step[keep],
                self._col[keep],
                self._value[keep],
            )
        rec = Records(
            self._step,
            self._col,
            self._value,
            self._columns,
            since,
            layers,
            self._first,
            self.context,
        )
        return self.evaluate(rec, rules)

    def _column(self, key: tuple[str, str, str]) -> int:
        c = self._cid.get(key)
        if c is None:
            c = self._cid[key] = len(self._columns)
            self._columns.append(key)
        return c

    def evaluate(self, rec: Records, rules: tuple[Rule, ...] | None = None) -> list[Finding]:
        """Run the rules (default: all) on ``rec`` and merge the episodes into the findings.
        Each rule reports from the first step it has not evaluated yet. New findings are
        announced once every episode is merged, so a group is told with all its layers."""
        raised: list[Finding] = []
        default_since = rec.since
        big = len(rec.layers.rank) + 1
        for rule in self.rules:
            if rules is not None and rule not in rules:
                continue
            rec.since = self._pending.pop(rule, default_since)
            try:
                episodes = rule(rec, self.t)
            except Exception as exc:  # a rule bug must not stop the others (or training)
                self.errors.append(f"{rule.__name__}: {exc!r}")
                continue
            # the episode that names a group comes first: the strongest where the rule
            # measured strengths, else the first in forward order (stable otherwise)
            episodes = sorted(
                episodes,
                key=lambda e: (
                    0.0 if e.strength is None else -e.strength,
                    rec.layers.rank.get(e.layer, big),
                ),
            )
            for ep in episodes:
                new = self.merge(ep, announce=False)
                if new is not None:
                    raised.append(new)
        self._settle()
        for f in raised:
            self.announce(f, True)
        return raised

    # -- findings ----------------------------------------------------------------------------------
    def merge(self, ep: Episode, announce: bool = True) -> Finding | None:
        """Extend the matching open finding, join a group of the same kind and cause over
        overlapping steps, or raise a new finding (returned; announced unless ``announce`` is
        False, when the caller announces it)."""
        if ep.kind == "nonfinite":
            return self._merge_nonfinite(ep, announce)
        # a condition that continues on the same layer extends its finding whatever the cause
        # the later episode names (a born-dead layer judged at a later flush reads as "died");
        # only what follows a swap is a finding of its own
        key = (ep.kind, ep.layer, ep.cause if ep.cause in _OWN_CAUSES else "")
        open_ = self._open.get(key)
        if open_ is not None and ep.first_step <= open_["last_step"] + self.t.merge_gap:
            self._extend(open_, ep)
            return None
        group = self._group_for(ep)
        if group is not None:
            layers = group.setdefault("layers", [group["layer"]])
            for name in [ep.layer, *ep.layers]:
                if name not in layers:
                    layers.append(name)
            self._open[key] = group
            self._extend(group, ep)
            return None
        finding = finding_from(ep, self.context)
        self._open[key] = finding
        self._cause[id(finding)] = ep.cause
        self.findings.append(finding)
        if announce:
            self.announce(finding, True)
        return finding

    def _group_for(self, ep: Episode) -> Finding | None:
        """The finding ``ep`` joins: same kind and cause, steps overlapping (run-level
        findings are not grouped)."""
        if ep.layer == RUN_LAYER:
            return None
        f: Finding
        for f in reversed(self.findings):
            if (
                f["kind"] == ep.kind
                and f["layer"] != RUN_LAYER
                and self._cause.get(id(f)) == ep.cause
                and ep.first_step <= f["last_step"]
                and f["first_step"] <= ep.last_step
            ):
                return f
        return None

    def _extend(self, finding: Finding, ep: Episode) -> None:
        """Move ``last_step``; evidence: what describes the start stays (``_STICKY``), the
        peak group (``peak_*`` with the numbers measured at the peak) follows the larger peak,
        everything else is the latest value. Another layer of a group moves the steps and the
        severity only: the evidence and the message are the primary layer's."""
        finding["first_step"] = min(finding["first_step"], ep.first_step)
        finding["last_step"] = max(finding["last_step"], ep.last_step)
        if ep.severity == "error":
            finding["severity"] = "error"
        if ep.layer != finding["layer"]:
            return
        old = finding["evidence"]
        new = _jsonable(ep.evidence)
        peak_key = next((k for k in _PEAKS if k in new and k in old), None)
        higher = (
            peak_key is not None
            and isinstance(new[peak_key], (int, float))
            and isinstance(old[peak_key], (int, float))
            and new[peak_key] > old[peak_key]
        )
        for k, v in new.items():
            if k in _STICKY and k in old:
                continue
            if peak_key is not None and (k.startswith("peak") or k in _AT_PEAK) and not higher:
                continue
            old[k] = v
        if higher and peak_key == "peak_ratio":  # the message tells the peak: the larger one
            finding["message"] = render(ep.message, self.context)
            self._notes.pop(id(finding), None)

    def _settle(self) -> None:
        """What a remedy in force did about a finding, kept current at the end of its
        message: the guard's skipped steps on the ``nonfinite`` finding (the count grows as the
        run goes on, so it is rewritten, never appended twice)."""
        ctx, f = self.context, self._nonfinite
        if f is None or not ctx.guard:
            return
        skipped = max(ctx.guard_skipped, int(f["evidence"].get("skipped_by_guard", 0) or 0))
        f["evidence"]["skipped_by_guard"] = skipped
        note = (
            f"; {setting('guard', True)} skipped {skipped} optimizer step(s) whose gradients "
            "were non-finite, so the weights stayed finite"
            if skipped
            else f"; {setting('guard', True)} is on but skipped no step (the non-finite "
            "values did not reach the gradients of an optimizer step)"
        )
        note = render(note, ctx)
        old = self._notes.get(id(f))
        message = f["message"]
        if old is not None and message.endswith(old):
            message = message[: -len(old)]
        f["message"] = message + note
        self._notes[id(f)] = note

    def _merge_nonfinite(self, ep: Episode, announce: bool = True) -> Finding | None:
        """One ``nonfinite`` finding per run: the first occurrence is the one to fix (later
        ones usually follow from it: NaN weights make every later step NaN). Later
        occurrences extend it. A traced attribution (the tracer named the module) wins over
        the records' inference; between two of the same standing, the earlier one wins."""
        f = self._nonfinite
        if f is None:
            f = self._nonfinite = finding_from(ep, self.context)
            self.findings.append(f)
            if announce:
                self._settle()
                self.announce(f, True)
            return f
        first = min(f["first_step"], ep.first_step)
        last = max(f["last_step"], ep.last_step)
        f_traced = bool(f["evidence"].get("traced"))
        ep_traced = bool(ep.evidence.get("traced"))
        better = (ep_traced and not f_traced) or (
            ep_traced == f_traced and ep.first_step < f["first_step"]
        )
        notes = list(f["evidence"].get("notes", []))
        old_note = self._notes.pop(id(f), "")
        old_msg = f["message"][: len(f["message"]) - len(old_note)]
        if old_note and not f["message"].endswith(old_note):
            old_msg = f["message"]
        f["message"] = old_msg
        ep_msg = render(ep.message, self.context)
        if better:
            f.update(finding_from(ep, self.context))
            if len(notes) < 5:
                notes.append(old_msg)
        elif ep_msg != old_msg and len(notes) < 5 and ep_msg not in notes:
            notes.append(ep_msg)
        if notes:
            f["evidence"]["notes"] = notes
        f["first_step"], f["last_step"] = first, last
        if better and first < ep.first_step:
            # traced later than the records first saw it (on an accelerator, the tracer armed
            # at the first flag): the message says both, so it agrees with first_step
            f["message"] += f" (non-finite values were recorded from step {first})"
        if not ep_traced and "nonfinite_steps" in ep.evidence:
            f["evidence"]["nonfinite_steps"] = max(
                int(f["evidence"].get("nonfinite_steps", 0)), int(ep.evidence["nonfinite_steps"])
            )
        if "skipped_by_guard" in ep.evidence:
            f["evidence"]["skipped_by_guard"] = max(
                int(f["evidence"].get("skipped_by_guard", 0) or 0),
                int(ep.evidence["skipped_by_guard"]),
            )
        self._settle()
        if better:
            # a better attribution (traced, or an earlier step) replaces what was announced:
            # say so, or the line printed at the time contradicts the final finding
            self.announce(f, False)
        return None

    def attach(self, finding: Finding, action: RemedyAction) -> None:
        """List what a remedy did about ``finding`` (one of :attr:`findings`) under its
        ``remedies``."""
        finding.setdefault("remedies", []).append(action)

    def snapshot(self) -> list[Finding]:
        """A deep copy of the findings (safe to hand to users and writers)."""
        return copy.deepcopy(self.findings)


def layer_info(describe: list[dict[str, Any]], sites: list[str]) -> LayerInfo:
    """LayerInfo from ``LayerTable.describe()`` (forward order) and the activation sites."""
    info = LayerInfo()
    rank = 0
    module_rank: dict[str, int] = {}
    for entry in describe:
        name = entry["name"]
        info.module_type[name] = entry["type"]
        if entry["kind"] == "module":
            module_rank[name] = rank
            info.family[name] = entry.get("family")
            label = entry.get("functional")
            if isinstance(label, str):  # F.relu(self.conv1(x)): "F.relu after conv1"
                anchor = entry.get("anchor")
                where = f"after {anchor}" if anchor else f"in {entry.get('within')}.forward()"
                info.functional[name] = f"{label} {where}"
        else:
            info.module_of[name] = entry["module"]
            info.ndim[name] = len(entry.get("shape", []))
            info.shape[name] = tuple(int(d) for d in entry.get("shape", []))
        info.rank[name] = rank
        rank += 1
    for site in sites:
        base, _, suffix = site.partition("#")
        if site != base:
            info.rank[site] = info.rank.get(base, rank) * 1000 + int(suffix or 0)  # after base
            info.family[site] = info.family.get(base)
            info.module_type[site] = info.module_type.get(base, "")
            if base in info.functional:
                info.functional[site] = info.functional[base]
    # scale plain ranks so "name#k" sorts right after "name"
    for name in list(info.rank):
        if "#" not in name:
            info.rank[name] = info.rank[name] * 1000
    info.rank.setdefault(RUN_LAYER, -1)
    modules = [e["name"] for e in describe if e["kind"] == "module"]
    # every proper prefix "a", "a.b" of a name "a.b.c": linear in the names, not quadratic
    parents = {name[:i] for name in modules for i, ch in enumerate(name) if ch == "."}
    for name in modules:
        if (name == ROOT and len(modules) > 1) or name in parents:
            info.containers.add(name)
    return info
