"""Metric sinks for training: TensorBoard event files and a one-line progress logger.

`TensorBoardWriter` writes TensorBoard event files without TensorFlow, tensorboardX or clu: every record is an
`Event` protobuf encoded by hand (only the handful of fields a scalar needs) and framed as a TFRecord
(length, masked CRC32C of the length, payload, masked CRC32C of the payload). The files are read by the stock
TensorBoard (`tensorboard --logdir ...`) and by `tf.compat.v1.train.summary_iterator`.

Storage:
  * Local paths are written with plain Python file I/O: one file opened once, records appended, `flush()` flushes
    the OS buffer.
  * URL paths (`gs://bucket/...`, any `scheme://`) go through `etils.epath`. Object stores cannot append, so the
    writer keeps the current file's bytes in memory and REWRITES the whole object on every `flush()`; the object
    only ever grows by appending, so TensorBoard's incremental reader sees ordinary appends. To bound the cost of
    a rewrite, once a file holds `max_file_bytes` the writer rolls over to a new event file (a new name that sorts
    after the old one; TensorBoard reads all event files of a directory in name order).

Only process 0 of a multi-host job should create a writer (the caller's concern).

`ProgressLogger` formats a human-readable line per logging step:

    step  120/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | 5,321 tok/s | ETA 4m12s
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

__all__ = [
    "TensorBoardWriter",
    "ProgressLogger",
    "format_duration",
    "write_scalars",
    "crc32c",
    "masked_crc32c",
]


# --------------------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing.
# --------------------------------------------------------------------------------------------------------------


def _make_crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Reflected Castagnoli polynomial.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; pure Python, fine for the few KB/s a metric stream produces."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord stores: rotate right by 15 bits, add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


# --------------------------------------------------------------------------------------------------------------
# Hand-rolled protobuf encoding of the Event fields we need.
#
#   Event:          wall_time (1, double), step (2, int64), file_version (3, string), summary (5, Summary)
#   Summary:        value (1, repeated Summary.Value)
#   Summary.Value:  tag (1, string), simple_value (2, float)
# --------------------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement: negative numbers take 10 bytes, as in protobuf.
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _encode_event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
                  summary: bytes | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode("utf-8"))
    if summary is not None:
        out += _length_delimited(5, summary)
    return out


def _encode_scalar_summary(values: Mapping[str, float]) -> bytes:
    out = b""
    for tag, value in values.items():
        entry = _length_delimited(1, str(tag).encode("utf-8")) + _key(2, 5) + struct.pack("<f", float(value))
        out += _length_delimited(1, entry)
    return out


# --------------------------------------------------------------------------------------------------------------
# Sinks: append to a local file, or rewrite an object-store object.
# --------------------------------------------------------------------------------------------------------------

_FILE_COUNTER = itertools.count()


def _event_file_name() -> str:
    # Same pattern as TensorFlow's writer: events.out.tfevents.<time>.<host>.<pid>.<uid>. The pid and a process-wide
    # counter keep two writers started in the same second (or a rollover) from clobbering each other.
    return f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER)}"


def _is_url(path: str) -> bool:
    return "://" in path


class _LocalSink:
    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, _event_file_name())
        self._file = open(self.path, "ab")  # noqa: SIM115 -- closed in close().

    def write(self, record: bytes) -> None:
        self._file.write(record)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RewriteSink:
    """For stores without append (GCS): keep the file's bytes, rewrite the object on flush, roll over at a size."""

    def __init__(self, logdir: Any, header: Callable[[], bytes], max_file_bytes: int):
        from etils import epath

        self._dir = epath.Path(logdir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._header = header
        self._max_file_bytes = max_file_bytes
        self._open_new_file()

    def _open_new_file(self) -> None:
        self.path = self._dir / _event_file_name()
        self._buffer = bytearray(self._header())
        self._dirty = True

    def write(self, record: bytes) -> None:
        self._buffer += record
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self.path.write_bytes(bytes(self._buffer))
            self._dirty = False
        if len(self._buffer) >= self._max_file_bytes:
            self._open_new_file()
            self._dirty = False  # Do not create an object holding only the header; it is written with the next data.

    def close(self) -> None:
        pass  # The writer flushes before closing; nothing is held open.


# --------------------------------------------------------------------------------------------------------------
# The writer.
# --------------------------------------------------------------------------------------------------------------


class TensorBoardWriter:
    """Writes scalar summaries to a TensorBoard event file in `logdir` (local path or `gs://...`).

    Args:
      logdir: directory for the event file; created if missing.
      flush_secs: `scalars()` flushes by itself when this long has passed since the last flush (like TensorFlow's
        writer). `flush()` / `close()` always flush.
      rewrite_on_flush: keep the file in memory and rewrite it on flush instead of appending. Default (None): on for
        URL paths (`gs://...`), off for local paths.
      max_file_bytes: in rewrite mode, start a new event file once the current one is this large.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 120.0, rewrite_on_flush: bool | None = None,
                 max_file_bytes: int = 4 << 20):
        self.logdir = str(logdir)  # str() of a pathlib / epath path ('gs://...' stays a URL).
        self._flush_secs = flush_secs
        if rewrite_on_flush is None:
            rewrite_on_flush = _is_url(self.logdir)
        if rewrite_on_flush:
            self._sink: _LocalSink | _RewriteSink = _RewriteSink(self.logdir, self._header, max_file_bytes)
        else:
            self._sink = _LocalSink(self.logdir)
            self._sink.write(self._header())
        self._closed = False
        self._last_flush = time.monotonic()

    @staticmethod
    def _header() -> bytes:
        return _tfrecord(_encode_event(time.time(), file_version="brain.Event:2"))

    @property
    def path(self) -> str:
        """The event file currently being written."""
        return str(self._sink.path)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes one event holding every `tag -> value` (converted with `float()`: numpy / JAX scalars are fine)."""
        if self._closed:
            raise ValueError("TensorBoardWriter is closed")
        if not values:
            return
        summary = _encode_scalar_summary(values)
        self._sink.write(_tfrecord(_encode_event(time.time(), step=int(step), summary=summary)))
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._closed:
            return
        self._sink.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._sink.flush()
        self._sink.close()
        self._closed = True

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ScalarWriter(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...


def write_scalars(writers: Iterable[_ScalarWriter], step: int, values: Mapping[str, float]) -> None:
    """Sends the same scalars to several writers (any object with `.scalars(step, values)`)."""
    for writer in writers:
        writer.scalars(step, values)


# --------------------------------------------------------------------------------------------------------------
# Human-readable progress.
# --------------------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """'12s', '4m12s', '1h02m', '2d03h'; 'n/a' for NaN/inf; negative durations clamp to '0s'."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    total = max(0, int(round(seconds)))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


# Known metrics: (key, label, format spec), in display order. Other keys follow in the order given, with '.4g'.
_KNOWN_METRICS = (
    ("loss", "loss", ".4f"),
    ("lr", "lr", ".2e"),
    ("learning_rate", "lr", ".2e"),
    ("grad_norm", "grad_norm", ".3f"),
)


def _format_value(value: Any, spec: str) -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


class ProgressLogger:
    """Logs `step  120/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | 5,321 tok/s | ETA 4m12s`.

    Throughput is measured by wall clock between `log()` calls, over the last `window` intervals (the first
    `log()` after the start has no interval yet and prints `tok/s n/a`, which also keeps compilation time out of
    the rate). ETA = remaining steps / that recent step rate.

    Args:
      total_steps: the step the run ends at.
      start_step: the step training (re)starts from (a restored checkpoint's step).
      tokens_per_step: global tokens per optimizer step (global batch * sequence length).
      log_fn: where lines go (`logging.info` by default; `print` works).
      clock: seconds as a float; `time.monotonic` by default (tests inject a fake).
      window: number of recent intervals the rate is averaged over.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, tokens_per_step: int,
                 log_fn: Callable[[str], Any] = logging.info, clock: Callable[[], float] = time.monotonic,
                 window: int = 10):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.tokens_per_step = int(tokens_per_step)
        self._log_fn = log_fn
        self._clock = clock
        self._start_time = clock()
        self._points: deque[tuple[int, float]] = deque(maxlen=max(1, window) + 1)
        self._first_point: tuple[int, float] | None = None
        self._last_point: tuple[int, float] | None = None
        self._width = len(str(self.total_steps))

    def steps_per_sec(self) -> float | None:
        """Recent optimizer steps per second, or None before two `log()` calls."""
        if len(self._points) < 2:
            return None
        (step0, t0), (step1, t1) = self._points[0], self._points[-1]
        if t1 <= t0 or step1 <= step0:
            return None
        return (step1 - step0) / (t1 - t0)

    def tokens_per_sec(self) -> float | None:
        rate = self.steps_per_sec()
        return None if rate is None else rate * self.tokens_per_step

    def eta_seconds(self, step: int) -> float | None:
        rate = self.steps_per_sec()
        if step >= self.total_steps:
            return 0.0
        return None if rate is None else (self.total_steps - step) / rate

    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        parts = [f"step {int(step):>{self._width}d}/{self.total_steps}"]
        shown = set()
        for key, label, spec in _KNOWN_METRICS:
            if key in metrics and label not in shown:
                parts.append(f"{label} {_format_value(metrics[key], spec)}")
                shown.add(label)
        skip = {key for key, _, _ in _KNOWN_METRICS} | {"step"}  # A 'step' entry repeats the step column.
        for key, value in metrics.items():
            if key not in skip:
                parts.append(f"{key} {_format_value(value, '.4g')}")
        tok_rate = self.tokens_per_sec()
        parts.append("tok/s n/a" if tok_rate is None else f"{tok_rate:,.0f} tok/s")
        eta = self.eta_seconds(step)
        parts.append(f"ETA {'n/a' if eta is None else format_duration(eta)}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """Records a (step, time) point, emits the line through `log_fn` and returns it."""
        point = (int(step), self._clock())
        self._points.append(point)
        if self._first_point is None:
            self._first_point = point
        self._last_point = point
        line = self.format_line(step, metrics or {})
        self._log_fn(line)
        return line

    def mean_tokens_per_sec(self) -> float | None:
        """Tokens/s from the first to the last `log()` call (so excluding start-up and compilation)."""
        if self._first_point is None or self._last_point is None:
            return None
        (step0, t0), (step1, t1) = self._first_point, self._last_point
        if t1 <= t0 or step1 <= step0:
            return None
        return (step1 - step0) * self.tokens_per_step / (t1 - t0)

    def summary(self) -> str:
        """E.g. `done 880 steps (120 -> 1000) in 4m12s | mean 5,321 tok/s`. Returned, not logged: the caller decides."""
        last_step = self._last_point[0] if self._last_point else self.start_step
        elapsed = self._clock() - self._start_time
        mean = self.mean_tokens_per_sec()
        return (
            f"done {last_step - self.start_step} steps ({self.start_step} -> {last_step}) in "
            f"{format_duration(elapsed)} | mean {'n/a' if mean is None else f'{mean:,.0f}'} tok/s"
        )
