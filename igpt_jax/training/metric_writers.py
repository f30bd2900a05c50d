"""Metric sinks for training: TensorBoard event files and a one-line progress logger.

`TensorBoardWriter` writes scalars with TensorBoard's own writer, `tensorboard.summary.Writer` (the `tensorboard`
package's public, numpy-only writing API; no TensorFlow, no torch). Each writer starts its own event file (named with
the time, host, process id and a counter, so two writers started in the same second do not collide); `flush()` blocks
until every scalar written so far is in the file (the training jobs flush before each checkpoint).
`drop_events_after(logdir, step)` rewrites the event files of a directory without the events after a step, which a
resumed run calls so that TensorBoard sees every step once (the steps a killed run logged after its last checkpoint
are redone by the resumed run); it reads with TensorBoard's event file loader.

Why not tensorboardX: its package import loads torch whenever torch is installed (1.1 s per process here, where the
tests and the Hugging Face converter install it), and its `SummaryWriter.flush()` does not wait for the events still
in its queue (measured: 3 scalars then `flush()` left the file without them in 50 of 50 tries).

Storage: local paths are written in place. URLs (``gs://...``): object stores cannot append, and TensorBoard's writer
without TensorFlow appends through fsspec (gcsfs turns an append into an overwrite), so the event file is written in a
local temporary directory and copied over the object with `etils.epath` (what Orbax uses for the checkpoints) on
every flush and at close; it only grows, so TensorBoard's incremental reader sees ordinary appends.

Only process 0 of a multi-host job should create a writer (the caller's concern).

`ProgressLogger` formats a human-readable line per logging step:

    step  120/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | 5,321 tok/s | 3.9 TFLOP/s/dev | MFU 1.4 % | ETA 4m12s

(the TFLOP/s per device and MFU when it is given the run's `igpt_jax.training.mfu.FlopsAccount`; ``MFU n/a`` on a
device without a known peak, such as a CPU).
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from etils import epath
from tensorboard import summary as tensorboard_summary
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from igpt_jax.training.mfu import FlopsAccount

__all__ = [
    "TensorBoardWriter",
    "ProgressLogger",
    "drop_events_after",
    "format_duration",
    "write_scalars",
]

EVENT_FILE_MARK = "tfevents"  # TensorBoard reads the files of a directory whose names contain this


class TensorBoardWriter:
    """Writes scalar summaries to a new TensorBoard event file in `logdir` (local path or ``gs://...``).

    Args:
      logdir: directory for the event file; created if missing.
      flush_secs: `scalars()` flushes by itself when this long has passed since the last flush. `flush()` and
        `close()` always flush.
      copy_on_flush: write the event file in a local temporary directory and copy it to `logdir` on every flush
        (default: for URLs such as ``gs://``, whose objects cannot be appended to).
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 120.0, copy_on_flush: bool | None = None):
        self.logdir = str(logdir)  # str() of a pathlib / epath path ('gs://...' stays a URL)
        self._copy = "://" in self.logdir if copy_on_flush is None else copy_on_flush
        self._local_dir = tempfile.mkdtemp(prefix="tensorboard-") if self._copy else self.logdir
        _wait_until_after_newest_event_file(self.logdir)
        self._writer = tensorboard_summary.Writer(self._local_dir)
        self._flush_secs = flush_secs
        self._closed = False
        self._last_flush = time.monotonic()
        if self._copy:
            self.flush()  # the file (its version header) appears at once, as a local one does

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes every `tag -> value` at `step` (converted with `float()`: numpy / JAX scalars are fine)."""
        if self._closed:
            raise ValueError("TensorBoardWriter is closed")
        wall_time = time.time()
        for tag, value in values.items():
            self._writer.add_scalar(str(tag), float(value), int(step), wall_time=wall_time)
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        """Puts every scalar written so far in the event file (and, with copy_on_flush, the file in `logdir`)."""
        if self._closed:
            return
        self._writer.flush()
        if self._copy:
            self._copy_out()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._writer.close()
        if self._copy:
            self._copy_out()
            shutil.rmtree(self._local_dir, ignore_errors=True)
        self._closed = True

    def _copy_out(self) -> None:
        directory = epath.Path(self.logdir)
        directory.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self._local_dir):  # the writer's one event file
            with open(os.path.join(self._local_dir, name), "rb") as f:
                (directory / name).write_bytes(f.read())

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wait_until_after_newest_event_file(logdir: str) -> None:
    """Waits (at most a second) until the clock has passed the newest event file's second in `logdir`.

    TensorBoard reads a directory's event files in name order, and a file's name starts with its creation second
    (``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``): a file made in the same second as an earlier one,
    by a resumed run or a second writer, would sort by process id or counter (as text), not by time, and its steps
    could be read before the earlier file's. Starting every file in a later second keeps name order the time order.
    """
    directory = epath.Path(logdir)
    seconds = []
    if directory.exists():
        for path in directory.iterdir():
            parts = path.name.split(".")
            if EVENT_FILE_MARK in path.name and len(parts) > 3 and parts[3].isdigit():
                seconds.append(int(parts[3]))
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.02)


def drop_events_after(logdir: str, step: int) -> int:
    """Rewrites the event files in `logdir` without the events of steps after `step`; returns how many it dropped.

    A run resumed from the checkpoint of `step` calls this before writing, so that the steps it redoes appear once.
    Each file is rewritten next to itself and renamed over (local paths), so a kill leaves the old or the new file.
    """
    directory = epath.Path(logdir)
    if not directory.exists():
        return 0
    dropped = 0
    for path in sorted(p for p in directory.iterdir() if EVENT_FILE_MARK in p.name):
        records = list(event_file_loader.RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if not _after(r, step)]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for r in kept:
            writer.write(r)
        if "://" in str(path):
            path.write_bytes(buffer.getvalue())
        else:
            target = path.parent / f".rewrite-{path.name.replace(EVENT_FILE_MARK, 'events')}"
            target.write_bytes(buffer.getvalue())
            os.replace(target, path)
    return dropped


def _after(record: bytes, step: int) -> bool:
    event = event_pb2.Event.FromString(record)
    return event.HasField("summary") and event.step > step


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
      flops: the run's FLOP accounting: the line then shows TFLOP/s per device and MFU (n/a without a known peak).
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, tokens_per_step: int,
                 log_fn: Callable[[str], Any] = logging.info, clock: Callable[[], float] = time.monotonic,
                 window: int = 10, flops: FlopsAccount | None = None):
        self.total_steps = int(total_steps)
        self.flops = flops
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

    def throughput(self) -> dict[str, float]:
        """The recent ``tokens_per_sec`` and, with a FLOP account, ``tflops_per_device`` and (with a known peak)
        ``mfu``; empty before two `log()` calls."""
        tok_rate = self.tokens_per_sec()
        if tok_rate is None:
            return {}
        return {"tokens_per_sec": tok_rate, **(self.flops.rates(tok_rate) if self.flops else {})}

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
        rates = self.throughput()
        parts.append(f"{rates['tokens_per_sec']:,.0f} tok/s" if rates else "tok/s n/a")
        if self.flops:
            parts.append(f"{rates['tflops_per_device']:.3g} TFLOP/s/dev" if rates else "TFLOP/s/dev n/a")
            parts.append(f"MFU {100 * rates['mfu']:.1f} %" if "mfu" in rates else "MFU n/a")
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
