"""TensorBoard scalars in ``tb/``: tags ``<metric>/<layer>`` and run-level ``<metric>``.

Written synchronously at each flush, in TensorBoard's own record format (length, masked CRC32C,
serialized ``Event``, masked CRC32C), one event per step carrying all of that step's values.
Why not ``SummaryWriter``: it queues every event to a background thread that checksums it with
tensorboard's pure-Python CRC32C (~0.3 ms per 2 KB event, measured), and blocks the training
thread when its small queue fills. Here the checksum is google-crc32c's C implementation when
installed (a dependency), and nothing runs between flushes.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..records import RUN_LAYER, LongTable


def tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a record: ``grad_norm/fc1.weight``; run level: ``loss``."""
    return metric if layer == RUN_LAYER else f"{metric}/{layer}"


def _crc32c() -> Callable[[bytes], int]:
    try:
        import google_crc32c

        return google_crc32c.value  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - the dependency is normally there
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c  # type: ignore[no-any-return]


class EventFile:
    """An append-only TensorBoard event file (the ``tfevents`` record format)."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.gs"
        self.path = log_dir / name
        self._crc = _crc32c()
        self._fh: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self.flush()

    def _masked(self, data: bytes) -> bytes:
        x = self._crc(data) & 0xFFFFFFFF
        return struct.pack("<I", (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._fh.write(header + self._masked(header) + record + self._masked(record))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, wall_time: float, summary: bytes) -> bytes:
    """A serialized ``Event{wall_time=1, step=2, summary=5}`` around an encoded Summary."""
    step_field = b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF)
    return b"\x09" + struct.pack("<d", wall_time) + step_field + _field(5, summary)


def value_prefix(name: str) -> bytes:
    """Everything of ``Summary.value[i] = Value{tag=name, simple_value=...}`` but the 4 bytes of
    the float, encoded once per tag: a Summary is then ``b"".join(prefix + float32 bytes)``.

    Hand-encoded protobuf (the wire format is stable, and tiny here): building one Python
    ``Summary.Value`` object per scalar was most of this sink's cost.
    """
    tag_field = _field(1, name.encode("utf-8"))
    value = tag_field + b"\x15"  # simple_value: field 2, fixed32
    return _varint(1 << 3 | 2) + _varint(len(value) + 4) + value


class TensorBoardSink:
    """Writes flushed records as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._file: EventFile | None = None
        self._prefixes: list[bytes] = []

    def write(self, table: LongTable) -> None:
        if not len(table):
            return
        if self._file is None:
            self._file = EventFile(self.log_dir)
        import numpy as np

        while len(self._prefixes) < len(table.columns):
            layer, _, metric = table.columns[len(self._prefixes)]
            self._prefixes.append(value_prefix(tag(layer, metric)))
        steps = table.step.tolist()
        cols = table.col.tolist()
        packed = np.asarray(table.value, dtype="<f4").tobytes()  # TensorBoard stores float32
        prefixes = self._prefixes
        now = time.time()
        start = 0
        for i in range(1, len(steps) + 1):  # records are grouped by step
            if i == len(steps) or steps[i] != steps[start]:
                summary = b"".join(
                    prefixes[cols[j]] + packed[4 * j : 4 * j + 4] for j in range(start, i)
                )
                self._file.write(scalar_event(steps[start], now, summary))
                start = i
        self._file.flush()

    def event(self, record: dict[str, Any]) -> None:
        """Remedy actions as TensorBoard text (tag ``remedies``), at their step. Other events
        (findings) are left to the report and ``events.jsonl``."""
        if record.get("event") not in ("remedy", "remedies"):
            return
        import json

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto

        if self._file is None:
            self._file = EventFile(self.log_dir)
        text = "; ".join(f"{k}: {json.dumps(v, default=str)}" for k, v in record.items()
                         if k != "event")
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype=7, string_val=[text.encode("utf-8")])  # DT_STRING
        summary = Summary(value=[Summary.Value(tag="remedies", metadata=meta, tensor=tensor)])
        step = record.get("step")
        ev = Event(wall_time=time.time(), step=int(step) if isinstance(step, int) else 0,
                   summary=summary)
        self._file.write(ev.SerializeToString())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
