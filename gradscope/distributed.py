"""Several processes (torch.distributed): who writes, what is sharded, and the flush exchange.

gradscope runs on PyTorch's own process groups; it adds no launcher and no transport of its own.
Every rank measures its own part (hooks are per process); rank 0 writes the one run directory.

At each flush the ranks combine what they buffered, on a gloo group of gradscope's own (host
tensors: the records are on the host by then, whatever the training's backend), with three
collectives per flush, never one per parameter or per step:

1. ``all_gather_object`` of a small header: the record columns each rank created since the last
   flush (so every rank lays the records out alike), the steps it holds, the per-unit masks it
   holds, and its events that concern the others (a NaN traced on that rank);
2. ``all_reduce(SUM)`` of everything that adds up: squared norms of sharded parameters (FSDP1,
   FSDP2/DTensor: the global norm is the root of the summed local squares), activation sums,
   element and threshold counts, losses, and how many ranks wrote each value;
3. ``all_reduce(MAX)`` of the peaks (``grad_max_abs`` of shards) and of the per-unit "alive"
   masks: a unit is dead only if it is dead on every rank's batch.

Gradients DDP has already averaged are replicated: they are read on each rank and never summed
again. The flushes happen at the same steps on every rank (every ``flush_every`` steps; the
time-based ``flush_secs`` is off with several processes, since a rank flushing on its own
clock would wait forever in the collective).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np

    from .buffer import Chunk

Key = tuple[str, str, str]
TIMEOUT = timedelta(minutes=10)  # a flush collective waiting longer than this gives up
RELEASE_GRACE = 0.05  # seconds the GIL is let go before gradscope's gloo group is destroyed

# How a record column combines across ranks.
LOCAL = "local"  # replicated (DDP gradients, the AMP scale): each rank's own value
SUM = "sum"  # adds up (counts, activation sums)
L2 = "l2"  # a norm: the root of the summed squares
MEAN = "mean"  # the mean over the ranks that wrote it (the loss)
MAX = "max"  # a peak
UNITS = "units"  # a per-unit dead mask: dead only where dead on every rank

_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def world() -> tuple[int, int] | None:
    """``(rank, world size)`` of an initialized default process group of several ranks."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun) set it, before any process group exists:
    only rank 0 writes a run directory."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def clean_name(name: str) -> str:
    """A module or parameter name without the components wrappers insert (FSDP1's
    ``_fsdp_wrapped_module``, activation checkpointing's, torch.compile's ``_orig_mod``): the
    names of the same model trained in one process."""
    if "_" not in name:
        return name
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    return ".".join(parts)


_DTENSOR: Any = None


def _dtensor_type() -> Any:
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = ()
        for mod in ("torch.distributed.tensor", "torch.distributed._tensor"):
            try:
                _DTENSOR = __import__(mod, fromlist=["DTensor"]).DTensor
                break
            except (ImportError, AttributeError):
                continue
    return _DTENSOR


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return bool(cls) and isinstance(t, cls)


def replicas_of_shards(models: Iterable[nn.Module], world_size: int) -> dict[int, int]:
    """``id(param) -> r`` for every sharded parameter: its gradient on each rank is a part, and
    each part is held by ``r`` ranks (1 for FSDP's full sharding, the replica count for hybrid
    sharding). Parameters not listed are replicated (DDP, or plain) and are never summed."""
    out: dict[int, int] = {}
    fsdp1 = _fsdp1_type()
    for model in models:
        for module in model.modules():
            if fsdp1 is not None and isinstance(module, fsdp1):
                handle = getattr(module, "_handle", None)
                if handle is None or not getattr(handle, "uses_sharded_strategy", False):
                    continue
                shard_size = int(getattr(module, "world_size", world_size) or world_size)
                r = max(world_size // max(shard_size, 1), 1)
                flat = handle.flat_param
                out[id(flat)] = r
                for p in getattr(flat, "_params", None) or ():  # use_orig_params=True
                    out[id(p)] = r
            for p in module.parameters(recurse=False):
                if is_dtensor(p):
                    r = 1
                    mesh: Any = p.device_mesh  # type: ignore[attr-defined]
                    sharded = False
                    for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
                        if placement.is_replicate():
                            r *= mesh.size(dim)
                        else:
                            sharded = True
                    if sharded:
                        out[id(p)] = r * max(world_size // max(mesh.size(), 1), 1)
    return out


def _fsdp1_type() -> Any:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FullyShardedDataParallel


Span = tuple[str, int, int, tuple[int, ...]]  # original name, offset, length, shape


def fsdp1_layout(model: nn.Module) -> tuple[dict[int, list[Span]], dict[int, tuple[int, ...]]]:
    """What FSDP1 (``FullyShardedDataParallel``) hides of the original parameters.

    Returns:
        ``id(flat) -> spans``: without ``use_orig_params`` each unit holds one flat parameter
        of all its original parameters; a span is one original parameter's part of this rank's
        shard (offset and length in the shard; length 0 where it has none), so each original
        parameter is measured on its own.
        ``id(param) -> shape``: with ``use_orig_params=True`` each original parameter is a
        flat view of its part of the shard; its original shape.
    """
    fsdp1 = _fsdp1_type()
    spans: dict[int, list[Span]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    if fsdp1 is None:
        return spans, shapes
    for module in model.modules():
        if not isinstance(module, fsdp1):
            continue
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        fqns = getattr(flat, "_fqns", None)
        infos = getattr(flat, "_shard_param_infos", None)
        sizes = getattr(flat, "_shapes", None)
        if flat is None or fqns is None or infos is None or sizes is None:
            continue
        originals = getattr(flat, "_params", None)
        if originals is not None:  # use_orig_params=True
            for p, shape in zip(originals, sizes):
                shapes[id(p)] = tuple(shape)
            continue
        spans[id(flat)] = [
            (fqn, int(info.offset_in_shard), int(info.numel_in_shard), tuple(shape))
            if info.in_shard
            else (fqn, 0, 0, tuple(shape))
            for fqn, shape, info in zip(fqns, sizes, infos)
        ]
    return spans, shapes


class Reducer:
    """The flush exchange of one Scope (see the module docstring).

    Args:
        rank, size: This process's rank and the world size.
        group: A gloo group over every rank (gradscope's own; :meth:`create`).
    """

    def __init__(self, rank: int, size: int, group: Any) -> None:
        self.rank = rank
        self.size = size
        self.group = group
        self.columns: list[Key] = []  # the layout every rank agrees on (append only)
        self._index: dict[Key, int] = {}
        self.outbox: list[dict[str, Any]] = []  # events for every rank (with "rank" set)
        self.stopped: str | None = None  # why the exchange stopped (a failed collective)
        self.backend: str | None = None  # the training's backend (nccl, gloo)

    @classmethod
    def create(cls) -> Reducer | None:
        """On several ranks: a reducer on a new gloo group (a collective: every rank creates
        its Scope at the same point, as it creates its model). None in a single process."""
        where = world()
        if where is None:
            return None
        dist = torch.distributed
        group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        reducer = cls(where[0], where[1], group)
        reducer.backend = str(dist.get_backend())
        return reducer

    def release(self) -> None:
        """Give the group back (at close; nothing is exchanged after it)."""
        group, self.group = self.group, None
        if self.stopped is None:
            self.stopped = "closed"
        if group is not None and _group_alive():
            # Let gloo's worker threads finish freeing the last collective's work first. Its
            # tensors can hold Python objects, so freeing them needs the GIL, and the group's
            # destructor joins those threads while holding it: torch 2.2 deadlocked there now
            # and then (py-spy: ~ProcessGroupGloo in std::thread::join, a worker in
            # ~AsyncAllgatherWork waiting for the GIL). Sleeping releases the GIL.
            time.sleep(RELEASE_GRACE)
            with contextlib.suppress(Exception):  # the default group went first: nothing to free
                torch.distributed.destroy_process_group(group)

    @property
    def active(self) -> bool:
        return self.stopped is None and self.group is not None and _group_alive()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the run directory's name)."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def exchange(
        self, chunk: Chunk | None, op_of: Callable[[Key], tuple[str, float]]
    ) -> tuple[Chunk | None, list[dict[str, Any]]]:
        """Combine every rank's chunk into one (the same on every rank); also returns every
        rank's outbox events, in rank order. ``op_of(key)``: how a column combines, and a factor
        (on the squares for ``L2``: ``1/r`` for ``r`` replicas of a shard)."""
        import numpy as np

        from .buffer import Chunk

        dist = torch.distributed
        vec_cells = (
            []
            if chunk is None
            else [
                (int(chunk.steps[r]), chunk.columns[c], int(v.shape[0]))
                for (r, c), v in chunk.vectors.items()
            ]
        )
        header = {
            "new": [] if chunk is None else [k for k in chunk.columns if k not in self._index],
            "steps": [] if chunk is None else chunk.steps.tolist(),
            "vectors": vec_cells,
            "events": self.outbox,
        }
        self.outbox = []
        headers: list[Any] = [None] * self.size
        dist.all_gather_object(headers, header, group=self.group)
        events = [e for h in headers for e in h["events"]]
        for h in headers:
            for key in h["new"]:
                key = tuple(key)
                if key not in self._index:
                    self._index[key] = len(self.columns)
                    self.columns.append(key)
        steps = sorted({s for h in headers for s in h["steps"]})
        if not steps:
            return None, events
        row_of = {s: i for i, s in enumerate(steps)}
        n_rows, width = len(steps), len(self.columns)
        values = np.full((n_rows, width), np.nan)
        written = np.zeros((n_rows, width), dtype=bool)
        mine: dict[tuple[int, int], np.ndarray] = {}
        if chunk is not None:
            rows = np.array([row_of[int(s)] for s in chunk.steps], dtype=np.int64)
            cols = np.array([self._index[k] for k in chunk.columns], dtype=np.int64)
            values[np.ix_(rows, cols)] = chunk.values
            written[np.ix_(rows, cols)] = chunk.written
            for (r, c), vec in chunk.vectors.items():
                mine[(int(rows[r]), int(cols[c]))] = vec
        # every rank lists the same vector cells, in the same order, with one agreed length
        lengths: dict[tuple[int, int], int] = {}
        clash: set[tuple[int, int]] = set()
        for h in headers:
            for step, key, n in h["vectors"]:
                cell = (row_of[step], self._index[tuple(key)])
                if lengths.setdefault(cell, n) != n:
                    clash.add(cell)
        cells = sorted(c for c in lengths if c not in clash)

        ops = [op_of(k) for k in self.columns]
        codes = np.array([o[0] for o in ops], dtype=object)
        factor = np.array([o[1] for o in ops], dtype=np.float64)
        summed = np.flatnonzero((codes == SUM) | (codes == L2) | (codes == MEAN))
        peaks = np.flatnonzero(codes == MAX)
        counted = np.flatnonzero(codes != LOCAL)

        w_f = written.astype(np.float64)
        v0 = np.where(written, values, 0.0)
        sq = v0[:, summed] ** np.where(codes[summed] == L2, 2.0, 1.0).astype(np.float64)
        pk = np.where(written[:, peaks], values[:, peaks], -np.inf)
        nan_pk = (written[:, peaks] & np.isnan(values[:, peaks])).astype(np.float64)
        alive = [1.0 - (mine[c] > 0.5) if c in mine else np.zeros(lengths[c]) for c in cells]
        sum_part = np.concatenate([sq.ravel(), w_f[:, counted].ravel(), nan_pk.ravel()])
        max_part = (
            np.concatenate([np.nan_to_num(pk, nan=-np.inf).ravel(), *alive])
            if (pk.size or alive)
            else np.zeros(0)
        )
        s_t = torch.from_numpy(np.ascontiguousarray(sum_part))
        m_t = torch.from_numpy(np.ascontiguousarray(max_part))
        dist.all_reduce(s_t, op=dist.ReduceOp.SUM, group=self.group)
        if m_t.numel():
            dist.all_reduce(m_t, op=dist.ReduceOp.MAX, group=self.group)
        s_all, m_all = s_t.numpy(), m_t.numpy()

        a = sq.size
        sq_tot = s_all[:a].reshape(sq.shape)
        b = a + n_rows * len(counted)
        count = np.zeros((n_rows, width))
        count[:, counted] = s_all[a:b].reshape(n_rows, len(counted))
        nan_any = s_all[b:].reshape(nan_pk.shape) > 0
        out_v = np.where(written, values, np.nan)
        out_w = written.copy()
        anyone = count > 0
        for j, c in enumerate(summed.tolist()):
            code, f = codes[c], factor[c]
            tot = sq_tot[:, j]
            if code == L2:
                res = np.sqrt(tot * f)
            elif code == MEAN:
                with np.errstate(divide="ignore", invalid="ignore"):
                    res = tot / count[:, c]
            else:
                res = tot * f
            out_v[:, c] = np.where(anyone[:, c], res, np.nan)
            out_w[:, c] = anyone[:, c]
        n_pk = pk.size
        if peaks.size:
            top = m_all[:n_pk].reshape(pk.shape)
            top = np.where(nan_any, np.nan, top)
            out_v[:, peaks] = np.where(anyone[:, peaks], top, np.nan)
            out_w[:, peaks] = anyone[:, peaks]
        vectors: dict[tuple[int, int], np.ndarray] = {}
        start = n_pk
        for cell in cells:
            n = lengths[cell]
            vectors[cell] = 1.0 - m_all[start : start + n]  # dead where no rank saw it alive
            start += n
        for cell in clash:  # widths differ between ranks: this rank's own mask
            if cell in mine:
                vectors[cell] = mine[cell]
        out_w[:, np.flatnonzero(codes == UNITS)] = False  # the value comes from the mask
        return Chunk(
            np.array(steps, dtype=np.int64), out_v, out_w, list(self.columns), vectors
        ), events


def _group_alive() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()
