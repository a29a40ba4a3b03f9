"""Several processes (torchrun, DDP, FSDP): what a Scope does differently on each rank.

Every rank measures; rank 0 writes the run directory. At each flush the ranks combine their
records on a gloo group of gradscope's own (:class:`gradscope.distributed.Reducer`): sharded
parameters' norms from summed squares, activation counts summed, a unit dead only if dead on
every rank, losses averaged. This module decides how each record column combines, which rank a
non-finite value came from first, and carries the other ranks' events (a traced NaN, an
internal error) to rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, rundir
from .config import Config
from .events import Event, Finding
from .layers import LayerTable
from .records import LongTable
from .rules.nonfinite import traced_episode

Record = Callable[[dict[str, Any]], None]
Merge = Callable[[Any], object]

SHARD_OPS = {  # a sharded parameter's records: its parts' norms, peaks and counts
    "grad_norm": distributed.L2,
    "grad_norm_clipped": distributed.L2,
    "weight_norm": distributed.L2,
    "_delta_norm": distributed.L2,
    "grad_max_abs": distributed.MAX,
    "grad_nonfinite": distributed.SUM,
    "weight_nonfinite": distributed.SUM,
}
SITE_OPS = {  # an activation site's raw statistics (ModuleProbe.complete derives the rest)
    "_sum": distributed.SUM,
    "_l2": distributed.L2,
    "_sat": distributed.SUM,
    "_nonfinite": distributed.SUM,
    "_n": distributed.SUM,
    "_rows": distributed.SUM,
    "_units": distributed.MAX,
    "_dead": distributed.UNITS,
}
RUN_OPS = {
    "loss": distributed.MEAN,
    "skipped_step": distributed.MAX,
    "guard_skipped": distributed.MAX,
}
_PHASE_ORDER = {"forward": 0, "backward": 1, "optimizer": 2}


class RankCoordinator:
    """One rank's part in a run of several processes.

    Args:
        dist: The flush exchange's reducer (on gradscope's own gloo group).
        models: The watched models (``{prefix: module}``), for the sharding map.
        table: The watched layers.
    """

    def __init__(
        self, dist: distributed.Reducer, models: Mapping[str, nn.Module], table: LayerTable
    ) -> None:
        self.dist = dist
        self._models = models
        self._table = table
        self.sharded: dict[str, float] = {}  # sharded parameter -> ranks holding each part
        self.bad_ranks: dict[int, dict[str, Any]] = {}  # rank -> its first non-finite value
        self._replicas_by_id: dict[int, int] = {}
        self._norm_factors: dict[Any, torch.Tensor] = {}
        self.record: Record = lambda event: None  # rank 0's store (wired by the Scope)
        self.merge: Merge = lambda episode: None  # the diagnoser's (wired by the Scope)
        self.step: Callable[[], int] = lambda: 0
        self.map_shards()

    @classmethod
    def create(
        cls, models: Mapping[str, nn.Module], table: LayerTable, config: Config
    ) -> RankCoordinator | None:
        """On several ranks (a collective: every rank creates its Scope at the same point);
        None in a single process.

        Raises:
            ValueError: A remedy that would act differently on each rank (one line).
        """
        dist = distributed.Reducer.create()
        if dist is None:
            return None
        ranks = cls(dist, models, table)
        params = table.params
        fsdp1 = any(
            s.span is not None or (s.name in ranks.sharded and not s.dtensor) for s in params
        )
        fsdp2 = any(s.dtensor and s.name in ranks.sharded for s in params)
        try:
            check_remedies(config, fsdp1, fsdp2)
        except ValueError:
            dist.release()
            raise
        return ranks

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run directory."""
        return self.dist.rank == 0

    @property
    def active(self) -> bool:
        """Whether the ranks still combine their records (not after a failure, a rank that
        ended differently, or ``destroy_process_group``)."""
        return self.dist.active

    def map_shards(self) -> None:
        """Which watched parameters are sharded (FSDP), by name, and over how many replicas
        (again when a model joins the run)."""
        replicas = distributed.replicas_of_shards(self._models.values(), self.dist.size)
        self._replicas_by_id = replicas
        self.sharded = {
            s.name: float(replicas[id(s.param)])
            for s in self._table.params
            if id(s.param) in replicas
        }

    def create_run_dir(self, config: Config, name: str) -> Path:
        """Rank 0 creates the run directory; every rank gets its path.

        Raises:
            ValueError: Rank 0 could not create it (on rank 0: its own error).
            RuntimeError: Rank 0 could not create it (on the other ranks).
        """
        made: Path | None = None
        error: BaseException | None = None
        if self.writer:
            try:
                made = rundir.create(config.out, name)
            except Exception as exc:  # told to the other ranks, then raised here
                error = exc
        path, problem = self.dist.broadcast(
            (str(made) if made else None, f"{type(error).__name__}: {error}" if error else None)
        )
        if error is not None:
            raise error
        if problem is not None:
            raise RuntimeError(f"gradscope: rank 0 could not create the run directory ({problem})")
        return Path(path)

    def stop(self, why: str) -> None:
        """No more exchanges (the other ranks may be gone or still training)."""
        self.dist.stopped = why

    # -- the flush exchange -------------------------------------------------------------------
    def exchange(self, chunk: Any, warn: Callable[[str], None]) -> Any:
        """Combine this flush's records with the other ranks' (the same result on every rank);
        on a failure (a rank gone, a timeout) this rank's own records, said once."""
        dist = self.dist
        if chunk is not None and dist.rank not in self.bad_ranks:
            first = first_nonfinite(chunk)
            if first is not None:  # which rank it came from: the rank's own loss/activations
                self.bad_ranks[dist.rank] = first
                dist.outbox.append(Event.nonfinite_rank(dist.rank, first))
        try:
            merged, events = dist.exchange(chunk, self.reduction)
        except Exception as exc:
            dist.stopped = repr(exc)
            step = self.step()
            note = (
                f"the ranks stopped combining their records ({exc!r}); from step "
                f"{step} on, rank {dist.rank}'s own records are written"
            )
            self.record(Event.distributed_stopped(dist.rank, step, note))
            warn(f"gradscope: {note}")
            return chunk
        self.events(events)
        return merged

    def flush_outbox(self) -> None:
        """What the exchange never carried (the run ends, or the group is gone)."""
        if self.dist.outbox:
            outbox, self.dist.outbox = self.dist.outbox, []
            self.events(outbox)

    def events(self, events: list[dict[str, Any]]) -> None:
        """Events of every rank: rank 0 writes them; a traced NaN/Inf joins every rank's
        findings, the earliest first (forward before backward, lower rank first)."""
        traced = sorted(
            (e for e in events if e.get("event") == "nonfinite_traced"),
            key=lambda e: (
                int(e.get("step", 0)),
                _PHASE_ORDER.get(str(e.get("phase")), 3),
                int(e.get("rank", 0)),
            ),
        )
        for e in [e for e in events if e.get("event") != "nonfinite_traced"] + traced:
            if e.get("event") == "nonfinite_rank":
                self.bad_ranks[int(e["rank"])] = {"step": e["step"], "in": e["in"]}
            if self.writer:
                self.record(e)
        for e in traced:
            self.merge(traced_episode({k: v for k, v in e.items() if k != "event"}))

    def traced(self, info: dict[str, Any]) -> None:
        """The tracer named a culprit on this rank: every rank hears of it at the next flush
        (at once when the ranks no longer exchange)."""
        self.dist.outbox.append(Event.nonfinite_traced(info, rank=self.dist.rank))
        if not self.active:
            self.flush_outbox()

    def evidence(self, findings: list[Finding]) -> list[Finding]:
        """Which rank's own values (its loss, its activations) turned non-finite first; DDP
        then spreads the NaN into every rank's gradients."""
        if not self.bad_ranks:
            return findings
        own = {r: v for r, v in self.bad_ranks.items() if v["in"] != "gradients"} or self.bad_ranks
        first = min(v["step"] for v in own.values())
        ranks = sorted(r for r, v in own.items() if v["step"] == first)
        for f in findings:
            if f["kind"] != "nonfinite":
                continue
            f["evidence"]["ranks"] = {str(r): v for r, v in sorted(self.bad_ranks.items())}
            if "on rank" not in f["message"]:
                which = ", ".join(map(str, ranks))
                f["message"] += (
                    f" (first on rank{'s' if len(ranks) > 1 else ''} {which}, "
                    f"in its {own[ranks[0]]['in']})"
                )
        return findings

    def combine_norms(self, params: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        """Each parameter's gradient norm over all ranks, from this rank's parts' norms: one
        all-reduce of the squares on the training's process group, on the norms' device (no
        host read), each divided by how many ranks hold the same part."""
        key = (tuple(id(p) for p in params), norms.device)
        factors = self._norm_factors.get(key)
        if factors is None:
            size = self.dist.size
            factors = torch.tensor(
                [1.0 / self._replicas_by_id.get(id(p), size) for p in params],
                dtype=norms.dtype,
                device=norms.device,
            )
            if len(self._norm_factors) > 16:
                self._norm_factors.clear()
            self._norm_factors[key] = factors
        sq = norms.square() * factors
        torch.distributed.all_reduce(sq)
        return sq.sqrt()

    def reduction(self, key: tuple[str, str, str]) -> tuple[str, float]:
        """How a record column combines across ranks (see :mod:`gradscope.distributed`)."""
        layer, kind, metric = key
        if kind == "param":
            replicas = self.sharded.get(layer)
            if replicas is None:  # replicated: DDP averaged it already
                return distributed.LOCAL, 1.0
            return SHARD_OPS.get(metric, distributed.LOCAL), 1.0 / replicas
        if kind == "module":
            if metric == "output_grad_norm":
                # the data-parallel loss is the mean of the ranks' losses: each rank's output
                # gradient is 1/size of its share of the global one
                return distributed.L2, 1.0 / self.dist.size**2
            return SITE_OPS.get(metric, distributed.LOCAL), 1.0
        return RUN_OPS.get(metric, distributed.LOCAL), 1.0

    def meta(self) -> dict[str, Any]:
        """run.json's ``distributed`` entry."""
        stopped = self.dist.stopped
        return {
            "world_size": self.dist.size,
            "backend": self.dist.backend,
            "sharded_params": len(self.sharded),
            "combined": stopped is None or "destroyed" in stopped,
            "stopped": stopped,
        }

    def release(self) -> None:
        self.dist.release()


class RankOutbox:
    """The store of a rank other than 0: writes nothing; the events that concern the run
    (an internal error on this rank) travel to rank 0 at the next flush."""

    def __init__(self, dist: distributed.Reducer) -> None:
        self._dist = dist

    def write(self, table: LongTable) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        if record.get("event") in ("internal_error", "distributed"):
            self._dist.outbox.append({**record, "rank": self._dist.rank})

    def write_findings(self, findings: list[Finding]) -> None:
        pass

    def close(self) -> None:
        pass


def first_nonfinite(chunk: Any) -> dict[str, Any] | None:
    """This rank's first step with a non-finite loss, activation or gradient, before the
    ranks' records are combined."""
    import numpy as np

    found: list[tuple[int, int, str]] = []
    for c, (_, kind, metric) in enumerate(chunk.columns):
        if metric == "loss":
            bad = chunk.written[:, c] & ~np.isfinite(chunk.values[:, c])
            where, rank = "loss", 0
        elif kind == "module" and metric == "_nonfinite":
            bad = chunk.written[:, c] & (chunk.values[:, c] > 0)
            where, rank = "activations", 0
        elif kind == "param" and metric == "grad_norm":
            bad = chunk.written[:, c] & ~np.isfinite(chunk.values[:, c])
            where, rank = "gradients", 1
        else:
            continue
        rows = np.flatnonzero(bad)
        if rows.size:
            found.append((int(chunk.steps[rows[0]]), rank, where))
    if not found:
        return None
    step, _, where = min(found)
    return {"step": step, "in": where}


def check_remedies(config: Config, fsdp1: bool, fsdp2: bool) -> None:
    """Remedies that would act differently on each rank are refused, in one line.

    Raises:
        ValueError: ``recycle`` (any sharding), ``clip``/``guard`` on FSDP1, AGC on FSDP2.
    """
    if config.recycle:
        raise ValueError(
            "recycle=True is not supported with several processes (each rank "
            "would re-initialise different units); use swap= instead"
        )
    if fsdp1 and (config.clip or config.guard):
        option = f"clip='{config.clip}'" if config.clip else f"guard={config.guard!r}"
        raise ValueError(
            f"{option} is not supported on FSDP1 (FullyShardedDataParallel) "
            "parameters: use its own clip_grad_norm_ (gradscope records the norms "
            "before and after it), or FSDP2 (fully_shard), where it is"
        )
    if fsdp2 and config.clip and config.clip.method == "agc":
        raise ValueError(
            f"clip='{config.clip}': AGC is not supported on sharded (FSDP2) "
            "parameters; use norm, autoclip or zclip"
        )
