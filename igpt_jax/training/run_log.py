"""What a training job records while it runs: metrics (progress line, TensorBoard, ``metrics.jsonl``) and the
preemption signal (SIGTERM, or SIGINT) that asks it to checkpoint and stop. `igpt_jax.training.loop.TrainingRun`
opens both for every job that trains.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import workdir as workdir_files
from igpt_jax.training.mfu import FlopsAccount
from igpt_jax.training.metric_writers import (
    ProgressLogger,
    TensorBoardWriter,
    drop_events_after,
)


class PreemptionWatcher:
    """Turns SIGTERM (preemption) or SIGINT (Ctrl-C) into a request to checkpoint and stop, agreed on by all
    processes at the same step.

    One process: both signals are caught; a second Ctrl-C while the checkpoint is being written interrupts at once
    (Python's KeyboardInterrupt). Several processes: JAX's preemption service catches SIGTERM on every host and
    agrees on a common step; SIGINT keeps its default behaviour there (a Ctrl-C reaches one host only).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop_at_step: int | None = None) -> None:
        self._stop_at_step = stop_at_step  # behaves as if SIGTERM arrived at this step (tests, drills)
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name = "SIGTERM"  # the signal that asked to stop (a drill's stop_at_step counts as SIGTERM)
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self._requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = name
        logging.warning("%s received: saving a checkpoint at the current step, then exiting%s", name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._stop_at_step is not None and step >= self._stop_at_step:
            return True
        if jax.process_count() > 1:
            # JAX's preemption service catches SIGTERM on every host and agrees on a common step.
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class RunLog:
    """The run's metrics: progress lines, TensorBoard, and ``metrics.jsonl``, from process 0.

    Metrics stay on the device until a flush, so logging never stalls the step pipeline; a flush fetches every
    pending step, raises on the first non-finite loss, and records them all. `sync()` puts everything recorded on
    disk (call it before saving a checkpoint). A run that starts at `start_step` (resumed from that checkpoint)
    first drops what an earlier, killed run recorded after it, in ``metrics.jsonl`` and in TensorBoard's event
    files, so that every step appears once; the resumed run's TensorBoard events go to a new event file.

    Each flush's last record also carries the wall-clock rates since the flushes before it (from the second flush
    on): ``tokens_per_sec`` and, given the run's `FlopsAccount`, ``tflops_per_device`` and (with a known peak)
    ``mfu``, in ``metrics.jsonl`` and as TensorBoard's ``perf/*``; the run's ``history`` leaves them out.
    """

    def __init__(self, workpath: epath.Path, *, num_steps: int, start_step: int, tokens_per_step: int, local: bool,
                 flops: FlopsAccount | None = None):
        primary = jax.process_index() == 0
        self.progress = ProgressLogger(num_steps, start_step=start_step, tokens_per_step=tokens_per_step, flops=flops)
        self.metrics_file = workpath / workdir_files.METRICS if primary else None
        # Local: appended at each record. Remote (gs://, whose objects cannot be appended to): records wait here and
        # the whole file is rewritten at each `sync` (before every checkpoint) and on closing.
        self.local, self.unsynced = local, []
        if primary:
            self._drop_after(workpath, start_step)
        self.writer = TensorBoardWriter(str(workpath / workdir_files.TENSORBOARD)) if primary else None
        self.pending: list[tuple[int, Any]] = []
        self.history: list[dict[str, float]] = []
        self.notes: dict[str, str] = {}  # shown in the progress line only (e.g. an evaluator's cost)

    def _drop_after(self, workpath: epath.Path, step: int) -> None:
        dropped = drop_events_after(str(workpath / workdir_files.TENSORBOARD), step)
        if self.metrics_file is not None and self.metrics_file.exists():
            lines = self.metrics_file.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            if len(kept) < len(lines):
                workdir_files.write_atomic(self.metrics_file, "".join(kept).encode())  # a kill leaves old or new
                dropped += len(lines) - len(kept)
        if dropped:
            logging.info("dropped %d metric records of steps after %d (logged by a run stopped after its last "
                         "checkpoint; they are redone now)", dropped, step)

    def sync(self) -> None:
        """Puts every metric recorded so far on disk (a local ``metrics.jsonl`` is written through at each record)."""
        if self.unsynced:
            old = self.metrics_file.read_text() if self.metrics_file.exists() else ""
            self.metrics_file.write_text(old + "".join(self.unsynced))
            self.unsynced = []
        if self.writer:
            self.writer.flush()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def flush(self, *, last_good: int | None, directory) -> None:
        fetched = jax.device_get(self.pending)
        self.pending = []
        records = []
        for step, metrics in fetched:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                where = f"step {last_good} in {directory}" if last_good is not None else "none saved yet"
                raise FloatingPointError(f"loss is {loss} at step {step}; stopping. Last good checkpoint: {where}")
            records.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if not records:
            return
        self.history.extend(records)
        last = records[-1]
        self.progress.log(last["step"], {**last, **self.notes})
        # The wall-clock rates (tokens/s, TFLOP/s per device, MFU) go with the flush's last step, to the files only:
        # the history holds what the step computed, the same in a resumed run and an uninterrupted one.
        rates = self.progress.throughput()
        self.append(records[:-1] + [{**last, **rates}])
        if self.writer:
            self.writer.scalars(last["step"], {f"train/{k}": v for k, v in last.items() if k != "step"})
            if rates:
                self.writer.scalars(last["step"], {f"perf/{k}": v for k, v in rates.items()})

    def validation(self, step: int, val: dict[str, float]) -> None:
        logging.info("step %d: validation loss %.4f nats/token (%.4f bits/token) over %d tokens", step, val["nll"],
                     val["bits_per_token"], int(val["tokens"]))
        self.append([{"step": step, "val_loss": val["nll"], "val_bits_per_token": val["bits_per_token"]}])
        if self.history and self.history[-1]["step"] == step:
            self.history[-1]["val_loss"] = val["nll"]
        if self.writer:
            self.writer.scalars(step, {"val/loss": val["nll"], "val/bits_per_token": val["bits_per_token"]})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Records an evaluator's scalars of a step in metrics.jsonl (one record) and TensorBoard (tags as given)."""
        self.append([{"step": step, **values}])
        if self.writer:
            self.writer.scalars(step, values)

    def append(self, records: list[dict[str, float]]) -> None:
        """Appends records (each with its ``step``) to metrics.jsonl as they are; nothing goes to TensorBoard."""
        if self.metrics_file is None:
            return
        lines = [json.dumps(r) + "\n" for r in records]
        if self.local:
            with open(self.metrics_file, "a") as f:
                f.writelines(lines)
        else:
            self.unsynced.extend(lines)

    def close(self) -> None:
        self.sync()
        if self.writer:
            self.writer.close()
