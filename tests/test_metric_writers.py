"""TensorBoard event files (TensorBoard's writer), read back as `tensorboard --logdir` reads them, and the progress
line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import (
    event_file_loader,
    plugin_event_accumulator,
)
from tensorboard.util import tensor_util

from igpt_jax.training.metric_writers import (
    ProgressLogger,
    TensorBoardWriter,
    drop_events_after,
    format_duration,
    write_scalars,
)

SCALARS = [
    (0, {"train/loss": 5.5451, "train/lr": 0.0}),
    (1, {"train/loss": 5.1, "train/lr": 1.2e-5}),
    (7, {"train/loss": np.float32(4.25), "train/lr": 3e-4, "eval/loss": 4.7}),
    (2**40 + 3, {"train/loss": 0.1}),
]


def _f32(x: float) -> float:
    return float(np.float32(x))


def _write(logdir, values=SCALARS) -> TensorBoardWriter:
    with TensorBoardWriter(str(logdir)) as writer:
        for step, vals in values:
            writer.scalars(step, vals)
    return writer


def _event_files(logdir) -> list[str]:
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n)


def _steps_in_file(path: str) -> list[int | None]:
    return [e.step if e.HasField("summary") else None for e in event_file_loader.EventFileLoader(path).Load()]


def _accumulate(logdir, purge_orphaned_data: bool = False):
    """TensorBoard's own reader (what its scalar dashboard reads), keeping every event."""
    acc = plugin_event_accumulator.EventAccumulator(str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0},
                                                    purge_orphaned_data=purge_orphaned_data)
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]


def test_tensorboard_reads_scalars(tmp_path):
    _write(tmp_path)
    assert len(_event_files(tmp_path)) == 1
    acc = _accumulate(tmp_path)
    assert sorted(acc.Tags()["tensors"]) == ["eval/loss", "train/loss", "train/lr"]
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, values in SCALARS:
        for tag, value in values.items():
            expected.setdefault(tag, []).append((step, _f32(value)))
    for tag, pairs in expected.items():
        assert _scalars(acc, tag) == pairs
    assert acc.file_version == 2.0


def test_flush_puts_every_scalar_on_disk_and_close_is_final(tmp_path):
    writer = TensorBoardWriter(str(tmp_path), flush_secs=1e9)
    for step in range(1, 4):
        writer.scalars(step, {"a": float(step)})
    writer.scalars(4, {})  # nothing written
    writer.flush()
    (path,) = _event_files(tmp_path)
    assert _steps_in_file(path) == [None, 1, 2, 3]  # the file-version header, then the steps, not closed
    writer.close()
    writer.close()  # idempotent
    writer.flush()  # no-op after close
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(5, {"a": 5.0})


def test_two_writers_started_together_write_two_files(tmp_path):
    a, b = TensorBoardWriter(tmp_path), TensorBoardWriter(tmp_path)  # a pathlib.Path works too
    a.scalars(1, {"x": 1.0})
    b.scalars(2, {"x": 2.0})
    a.close()
    b.close()
    assert len(_event_files(tmp_path)) == 2
    # Both files are read (in file-name order, which for writers started in the same second is arbitrary).
    assert sorted(_scalars(_accumulate(tmp_path), "x")) == [(1, 1.0), (2, 2.0)]


def test_drop_events_after_keeps_each_step_once_across_segments(tmp_path):
    # A run logs steps 1..7 and is killed; its checkpoint is step 4; the resumed run drops 5..7 and logs 5..9.
    _write(tmp_path, [(s, {"loss": 10.0 - s}) for s in range(1, 8)])
    assert drop_events_after(str(tmp_path), 4) == 3
    assert drop_events_after(str(tmp_path), 4) == 0  # nothing left to drop
    _write(tmp_path, [(s, {"loss": 100.0 - s}) for s in range(5, 10)])
    for purge in (False, True):  # with and without TensorBoard's purging of "orphaned" steps
        got = _scalars(_accumulate(tmp_path, purge), "loss")
        assert got == [(s, 10.0 - s) for s in range(1, 5)] + [(s, 100.0 - s) for s in range(5, 10)]
    assert not [n for n in os.listdir(tmp_path) if "rewrite" in n]
    assert drop_events_after(str(tmp_path / "missing"), 0) == 0


def test_copy_on_flush_puts_the_whole_file_in_logdir_at_each_flush(tmp_path):
    # What a gs:// logdir gets (objects cannot be appended to), exercised on a local path.
    logdir = tmp_path / "remote"
    writer = TensorBoardWriter(str(logdir), flush_secs=1e9, copy_on_flush=True)
    (path,) = _event_files(logdir)  # the version header is there from the start
    writer.scalars(1, {"a": 1.0})
    assert _steps_in_file(path) == [None]  # written locally, not copied yet
    writer.flush()
    assert _steps_in_file(path) == [None, 1]
    writer.scalars(2, {"a": 2.0})
    writer.close()
    assert _steps_in_file(path) == [None, 1, 2] and _event_files(logdir) == [path]
    assert drop_events_after(str(logdir), 1) == 1 and _steps_in_file(path) == [None, 1]


def test_the_writer_imports_neither_torch_nor_tensorboardx():
    code = ("import sys; import igpt_jax.training.metric_writers; "
            "print(sorted(m for m in ('torch', 'tensorboardX', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_write_scalars_fans_out():
    class Recorder:
        def __init__(self):
            self.calls = []

        def scalars(self, step, values):
            self.calls.append((step, dict(values)))

    a, b = Recorder(), Recorder()
    write_scalars([a, b], 3, {"x": 1.0})
    assert a.calls == b.calls == [(3, {"x": 1.0})]


# --------------------------------------------------------------------------------------------------------------
# ProgressLogger and format_duration.
# --------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


METRICS = {"grad_norm": 0.5321, "lr": 0.0012, "loss": 3.21428}  # Out of order on purpose.


def _logger(clock, lines, **kwargs):
    kwargs = {"start_step": 100, "tokens_per_step": 1024, **kwargs}
    return ProgressLogger(1000, log_fn=lines.append, clock=clock, **kwargs)


def test_progress_line_exact():
    clock, lines = FakeClock(), []
    progress = _logger(clock, lines)
    clock.t = 30.0  # Compilation: the first line has no rate.
    assert progress.log(110, METRICS) == (
        "step  110/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | tok/s n/a | ETA n/a"
    )
    clock.t = 32.0  # 10 steps in 2 s = 5 steps/s = 5,120 tok/s; 880 steps left = 176 s.
    assert progress.log(120, METRICS) == (
        "step  120/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | 5,120 tok/s | ETA 2m56s"
    )
    assert lines == [
        "step  110/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | tok/s n/a | ETA n/a",
        "step  120/1000 | loss 3.2143 | lr 1.20e-03 | grad_norm 0.532 | 5,120 tok/s | ETA 2m56s",
    ]


def test_progress_missing_extra_and_odd_metrics():
    clock, lines = FakeClock(), []
    progress = _logger(clock, lines)
    assert progress.log(100, {"step": 100}) == "step  100/1000 | tok/s n/a | ETA n/a"  # 'step' is not repeated.
    clock.t = 1.0
    line = progress.log(101, {"loss": np.float32(2.5), "accuracy": 0.912345, "note": "warmup", "learning_rate": 1e-4})
    assert line == (
        "step  101/1000 | loss 2.5000 | lr 1.00e-04 | accuracy 0.9123 | note warmup | 1,024 tok/s | ETA 14m59s"
    )
    clock.t = 2.0
    assert progress.log(102, {"loss": float("nan")}).startswith("step  102/1000 | loss nan | 1,024 tok/s")


def test_progress_eta_uses_recent_window():
    clock, lines = FakeClock(), []
    progress = _logger(clock, lines, window=2)
    for step, t in [(100, 0.0), (110, 100.0), (120, 101.0), (130, 102.0)]:  # A slow first interval, then 10 steps/s.
        clock.t = t
        progress.log(step, {})
    assert progress.steps_per_sec() == pytest.approx(10.0)  # The slow interval fell out of the 2-interval window.
    assert progress.eta_seconds(130) == pytest.approx(87.0)
    assert lines[-1] == "step  130/1000 | 10,240 tok/s | ETA 1m27s"
    clock.t = 103.0
    assert progress.log(1000, {}).endswith("| ETA 0s")

    wide = _logger(FakeClock(), [], window=10)
    for step, t in [(100, 0.0), (110, 100.0), (120, 101.0), (130, 102.0)]:
        wide._clock.t = t
        wide.log(step, {})
    assert wide.steps_per_sec() == pytest.approx(30 / 102)


def test_progress_summary():
    clock, lines = FakeClock(5.0), []
    progress = _logger(clock, lines)
    assert progress.summary() == "done 0 steps (100 -> 100) in 0s | mean n/a tok/s"
    for step, t in [(110, 35.0), (120, 37.0), (200, 45.0)]:
        clock.t = t
        progress.log(step, {"loss": 1.0})
    clock.t = 50.0
    # 90 steps * 1024 tokens over the 10 s between the first and last log calls.
    assert progress.summary() == "done 100 steps (100 -> 200) in 45s | mean 9,216 tok/s"
    assert len(lines) == 3  # summary() returns its line; only log() calls log_fn.


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (12, "12s"),
        (59.4, "59s"),
        (59.6, "1m00s"),
        (252, "4m12s"),
        (605, "10m05s"),
        (3720, "1h02m"),
        (3 * 3600 + 59 * 60 + 59, "3h59m"),
        (90000, "1d01h"),
        (-5, "0s"),
        (float("nan"), "n/a"),
        (float("inf"), "n/a"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_new_event_file_sorts_after_every_earlier_one_even_in_the_same_second(tmp_path):
    # TensorBoard reads event files in name order; a name starts with the second it was made, then the host, the
    # process id and a counter, compared as text. An earlier file whose counter is "9" made this very second would
    # sort after a new one whose counter is "10": the new writer starts its file in a later second instead.
    earlier = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.99999"
    earlier.write_bytes(b"")
    with TensorBoardWriter(str(tmp_path)) as writer:
        writer.scalars(1, {"loss": 1.0})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == earlier.name
