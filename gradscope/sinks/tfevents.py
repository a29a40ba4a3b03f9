"""TensorBoard's event-file record format, written by hand.

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
from typing import TYPE_CHECKING, BinaryIO, Callable

if TYPE_CHECKING:
    import numpy as np


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


def histogram_value(name: str, lo: float, hi: float, counts: np.ndarray) -> bytes:
    """``Summary.value[i] = Value{tag=name, histo=HistogramProto}`` (field 5) for counts of
    equal-width bins from ``lo`` to ``hi``. TensorBoard draws bin ``i`` from the previous limit
    (``lo`` for the first) to ``bucket_limit[i]``. ``sum``/``sum_squares`` come from the bin
    centres (TensorBoard's charts do not use them)."""
    import numpy as np

    counts = np.asarray(counts, dtype="<f8")
    bins = len(counts)
    if hi <= lo:  # every value equal: one bin
        counts = counts.sum(keepdims=True)
        limits = np.array([hi], dtype="<f8")
        centres = limits
    else:
        limits = lo + (hi - lo) * np.arange(1, bins + 1, dtype="<f8") / bins
        limits[-1] = hi
        centres = limits - (hi - lo) / (2 * bins)
    histo = (
        b"\x09"
        + struct.pack("<d", lo)
        + b"\x11"
        + struct.pack("<d", hi)
        + b"\x19"
        + struct.pack("<d", float(counts.sum()))
        + b"\x21"
        + struct.pack("<d", float(counts @ centres))
        + b"\x29"
        + struct.pack("<d", float(counts @ centres**2))
        + _field(6, limits.astype("<f8").tobytes())
        + _field(7, counts.tobytes())
    )
    return _field(1, _field(1, name.encode("utf-8")) + _field(5, histo))
