"""Typed records: the events of ``events.jsonl`` and the findings of ``findings.json``.

An :class:`Event` is a JSON-able dict with an ``"event"`` name, made by one constructor per
event type (``Event.internal_error(...)``, ``Event.remedy(...)``...), so that every event of a
type has the same keys wherever it is raised. It stays a ``dict`` because that is what the sinks
write and what users read back (``Run.events``, ``events.jsonl``); the on-disk shape of each type
is documented in ``docs/run-directory.md`` (events.jsonl).

A :data:`Finding` is the JSON shape of a finding (``docs/run-directory.md``, findings.json): a
``TypedDict``, so that code reading ``finding["layer"]`` is checked, and a user's
``scope.findings`` is plain data.

Nothing here imports torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from types import EllipsisType

if sys.version_info >= (3, 11) or TYPE_CHECKING:
    from typing import NotRequired, TypedDict
else:  # pragma: no cover - Python < 3.11: NotRequired keys are plain (total=False) keys
    from typing import TypedDict

Severity = Literal["error", "warning", "info"]


RemedyAction = TypedDict(
    "RemedyAction",
    {
        "remedy": str,  # "swap" or "recycle"
        "action": str,  # "swapped", "recycled" or "not_applied"
        "step": int,
        "layer": str,
        "reason": str,  # not_applied: why
        "from": str,
        "to": str,
        "rule": str,
        "places": int,  # swapped: the module types, the rule
        "units": int,
        "of": int,  # recycled: how many units of how many
    },
    total=False,
)
"""What a remedy did about a finding (listed under the finding's ``remedies``)."""


if sys.version_info >= (3, 11) or TYPE_CHECKING:

    class Finding(TypedDict):
        """One finding: the pathology, the layer, the steps, the evidence, what to try.
        ``layer`` is the primary layer and ``layers`` every layer the finding groups (the
        primary first; findings.json files written before 0.2 have no ``layers``: then the one
        layer is ``layer``). ``nonfinite`` findings add
        ``phase``, ``module`` and ``class``; remedies that acted on it are listed under
        ``remedies``."""

        kind: str
        severity: Severity
        layer: str
        layers: NotRequired[list[str]]
        first_step: int
        last_step: int
        evidence: dict[str, Any]
        message: str
        suggestion: str
        phase: NotRequired[str]
        module: NotRequired[str]
        remedies: NotRequired[list[RemedyAction]]
else:  # pragma: no cover
    Finding = dict


class Event(dict[str, Any]):
    """One line of ``events.jsonl``: ``{"event": <type>, ...}``. Make one with the constructor
    of its type; :meth:`user` wraps what a user passes to ``Scope.add_event``."""

    @property
    def name(self) -> str:
        return str(self["event"])

    @classmethod
    def _make(cls, name: str, /, **fields: Any) -> Event:
        event = cls(event=name)
        event.update(fields)
        return event

    # -- gradscope itself ---------------------------------------------------------------------
    @classmethod
    def internal_error(
        cls,
        where: str,
        error: BaseException | str,
        *,
        part: str | None = None,
        step: int | EllipsisType | None = ...,
        rank: int | None = None,
    ) -> Event:
        """An error inside gradscope, switched off by the guard (``part``), or a rule that
        raised (no part: the other rules ran). ``step`` where a step is known (None: before
        the first)."""
        fields: dict[str, Any] = {"where": where}
        if part is not None:
            fields["part"] = part
        fields["error"] = error if isinstance(error, str) else repr(error)
        if step is not ...:
            fields["step"] = step
        if rank is not None:
            fields["rank"] = rank
        return cls._make("internal_error", **fields)

    @classmethod
    def hooks_inactive(cls, step: int, reason: str) -> Event:
        """Steps end but no forward hook of ours ever ran."""
        return cls._make("hooks_inactive", step=step, reason=reason)

    @classmethod
    def distributed_stopped(cls, rank: int, step: int, reason: str) -> Event:
        """The flush exchange between ranks failed: this rank records on its own."""
        return cls._make("distributed", action="stopped", rank=rank, step=step, reason=reason)

    # -- what the training did ----------------------------------------------------------------
    @classmethod
    def skipped_step(cls, step: int, by: str, reason: str) -> Event:
        """An optimizer step that did not happen (GradScaler found inf/NaN)."""
        return cls._make("skipped_step", step=step, by=by, reason=reason)

    @classmethod
    def script_clip(cls, step: int, function: str, **detail: Any) -> Event:
        """The script clips its own gradients (first time only)."""
        return cls._make(
            "script_clip",
            step=step,
            function=function,
            **detail,
            note="grad_norm is read before the script's clip, grad_norm_clipped after it",
        )

    # -- findings and the NaN tracer ------------------------------------------------------------
    @classmethod
    def finding(cls, finding: Finding, new: bool) -> Event:
        """A finding raised (``finding``) or told again with better information
        (``finding_updated``)."""
        return cls._make("finding" if new else "finding_updated", **finding)

    @classmethod
    def nonfinite_traced(cls, info: dict[str, Any], rank: int | None = None) -> Event:
        """The tracer named the module that produced the first NaN/Inf."""
        event = cls._make("nonfinite_traced", **info)
        if rank is not None:
            event["rank"] = rank
        return event

    @classmethod
    def nonfinite_rank(cls, rank: int, first: dict[str, Any]) -> Event:
        """A rank saw its first non-finite value (told to rank 0 at the next flush)."""
        return cls._make("nonfinite_rank", rank=rank, **first)

    # -- remedies -------------------------------------------------------------------------------
    @classmethod
    def remedies(cls, described: dict[str, Any]) -> Event:
        """The remedies switched on for this run (once, at the start)."""
        return cls._make("remedies", **described)

    @classmethod
    def remedy(
        cls, remedy: str, action: str, step: int | EllipsisType | None = ..., **detail: Any
    ) -> Event:
        """Something a remedy did or could not do: ``remedy`` is ``clip``, ``guard``,
        ``swap`` or ``recycle``; ``step`` where it acted at one step (a summary over several
        steps, ``clipped``, has ``steps`` instead)."""
        fields: dict[str, Any] = {"remedy": remedy, "action": action}
        if step is not ...:
            fields["step"] = step
        return cls._make("remedy", **fields, **detail)

    @classmethod
    def remedy_inactive(cls, reason: str, step: int | None = None) -> Event:
        """A remedy option that cannot act (no such module, hooks that never run)."""
        fields: dict[str, Any] = {"action": "inactive"}
        if step is not None:
            fields["step"] = step
        fields["reason"] = reason
        return cls._make("remedy", **fields)

    # -- gradscope run and the integrations -----------------------------------------------------
    @classmethod
    def model_found(
        cls, key: str, type_name: str, step: int, parameters: int, trainable: int
    ) -> Event:
        """``gradscope run`` found a model in the script and watches it."""
        return cls._make(
            "model_found",
            key=key,
            type=type_name,
            step=step,
            parameters=parameters,
            trainable=trainable,
        )

    @classmethod
    def nothing_watched(cls, reason: str) -> Event:
        """``gradscope run`` found no model to watch."""
        return cls._make("nothing_watched", reason=reason)

    @classmethod
    def framework(cls, name: str, note: str, **detail: Any) -> Event:
        """What an integration (Lightning, Hugging Face) set up or could not."""
        return cls._make("framework", name=name, note=note, **detail)

    @classmethod
    def user(cls, record: dict[str, Any]) -> Event:
        """An event a user adds (``Scope.add_event``): kept as given."""
        return cls(record)
