"""TensorBoard event files written without TensorFlow, and the progress line."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

from igpt_jax import metric_writers
from igpt_jax.metric_writers import ProgressLogger, TensorBoardWriter, format_duration, write_scalars

# --------------------------------------------------------------------------------------------------------------
# An independent reader: bit-by-bit CRC32C (not the module's table) and a minimal protobuf decoder.
# --------------------------------------------------------------------------------------------------------------


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class CorruptRecord(Exception):
    pass


def _read_records(blob: bytes) -> list[bytes]:
    records, pos = [], 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        if length_crc != _masked(header):
            raise CorruptRecord(f"length CRC mismatch at offset {pos}")
        payload = blob[pos + 12 : pos + 12 + length]
        if len(payload) != length:
            raise CorruptRecord(f"truncated record at offset {pos}")
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        if data_crc != _masked(payload):
            raise CorruptRecord(f"data CRC mismatch at offset {pos}")
        records.append(payload)
        pos += 16 + length
    return records


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _decode(buf: bytes) -> list[tuple[int, int, object]]:
    """(field, wire_type, raw value) triples; raw is int (varint), bytes (fixed / length-delimited)."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.append((field, wire, value))
    return fields


def _parse_event(payload: bytes) -> dict:
    event: dict = {"values": {}}
    for field, wire, value in _decode(payload):
        if (field, wire) == (1, 1):
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif (field, wire) == (2, 0):
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif (field, wire) == (3, 2):
            event["file_version"] = value.decode()
        elif (field, wire) == (5, 2):
            for vfield, _, entry in _decode(value):
                assert vfield == 1
                parts = {(f, w): v for f, w, v in _decode(entry)}
                event["values"][parts[(1, 2)].decode()] = struct.unpack("<f", parts[(2, 5)])[0]
        else:
            raise AssertionError(f"unexpected Event field {field}")
    return event


def _event_files(logdir) -> list[str]:
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if n.startswith("events.out.tfevents."))


def _read_events(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [_parse_event(r) for r in _read_records(f.read())]


def _f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------------------------------------------
# CRC and encoding.
# --------------------------------------------------------------------------------------------------------------


def test_crc32c_known_vectors():
    assert metric_writers.crc32c(b"123456789") == 0xE3069283  # The standard CRC-32C check value.
    assert metric_writers.crc32c(b"") == 0
    assert metric_writers.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros.
    blob = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    assert metric_writers.crc32c(blob) == _crc32c_bitwise(blob)
    assert metric_writers.masked_crc32c(blob) == _masked(blob)


# --------------------------------------------------------------------------------------------------------------
# TensorBoardWriter, read back by hand.
# --------------------------------------------------------------------------------------------------------------

SCALARS = [
    (0, {"train/loss": 5.5451, "train/lr": 0.0}),
    (1, {"train/loss": 5.1, "train/lr": 1.2e-5}),
    (7, {"train/loss": np.float32(4.25), "train/lr": 3e-4, "eval/loss": 4.7}),
    (2**40 + 3, {"train/loss": 0.1}),
]


def _write(logdir, **kwargs) -> TensorBoardWriter:
    with TensorBoardWriter(str(logdir), **kwargs) as writer:
        for step, values in SCALARS:
            writer.scalars(step, values)
    return writer


def test_event_file_decodes_with_valid_crcs(tmp_path):
    before = time.time()
    writer = _write(tmp_path)
    (path,) = _event_files(tmp_path)
    assert path == writer.path
    name = os.path.basename(path)
    assert name.startswith("events.out.tfevents.") and len(name.split(".")) >= 5

    events = _read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and "step" not in events[0]
    assert [(e["step"], e["values"]) for e in events[1:]] == [
        (step, {tag: _f32(v) for tag, v in values.items()}) for step, values in SCALARS
    ]
    assert all(before - 1 <= e["wall_time"] <= time.time() + 1 for e in events)


@pytest.mark.parametrize("offset_from", ["length", "payload", "data_crc"])
def test_corrupted_byte_fails_crc(tmp_path, offset_from):
    _write(tmp_path)
    (path,) = _event_files(tmp_path)
    blob = bytearray(open(path, "rb").read())
    _read_records(bytes(blob))  # Intact: fine.
    first_len = struct.unpack("<Q", blob[:8])[0]
    second = 16 + first_len  # Start of the first scalar record.
    length = struct.unpack("<Q", blob[second : second + 8])[0]
    index = {"length": second + 1, "payload": second + 12 + length // 2, "data_crc": second + 12 + length}[offset_from]
    blob[index] ^= 0x01
    with pytest.raises(CorruptRecord):
        _read_records(bytes(blob))


def test_negative_step_and_empty_values(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:  # A pathlib.Path works too.
        writer.scalars(5, {})  # Nothing written.
        writer.scalars(-3, {"x": 1.5})
    events = _read_events(_event_files(tmp_path)[0])
    assert [(e.get("step"), e["values"]) for e in events] == [(None, {}), (-3, {"x": 1.5})]


def test_flush_makes_data_visible_and_close_is_final(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.scalars(1, {"a": 1.0})
    writer.flush()
    assert [e.get("step") for e in _read_events(writer.path)] == [None, 1]
    writer.close()
    writer.close()  # Idempotent.
    writer.flush()  # No-op after close.
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(2, {"a": 2.0})


def test_auto_flush_after_flush_secs(tmp_path):
    writer = TensorBoardWriter(str(tmp_path), flush_secs=0.0)
    writer.scalars(3, {"a": 3.0})
    assert [e.get("step") for e in _read_events(writer.path)] == [None, 3]  # Not closed, already on disk.
    writer.close()


def test_rewrite_mode_grows_by_appending_and_rolls_over(tmp_path):
    # The gs:// code path (etils.epath, rewrite the object on flush), exercised on a local directory.
    writer = TensorBoardWriter(str(tmp_path), rewrite_on_flush=True, max_file_bytes=200)
    first_path = writer.path
    writer.scalars(1, {"loss": 1.0})
    writer.flush()
    snapshot = open(first_path, "rb").read()
    writer.scalars(2, {"loss": 2.0})
    writer.flush()
    grown = open(first_path, "rb").read()
    assert grown.startswith(snapshot) and len(grown) > len(snapshot)
    for step in range(3, 12):
        writer.scalars(step, {"loss": float(step)})
        writer.flush()
    writer.close()

    files = _event_files(tmp_path)
    assert len(files) > 1 and files[0] == first_path
    steps = []
    for path in files:  # Every file is complete, starts with the version event, and steps continue in name order.
        events = _read_events(path)
        assert events[0]["file_version"] == "brain.Event:2"
        steps += [(e["step"], e["values"]["loss"]) for e in events[1:]]
    assert steps == [(s, float(s)) for s in range(1, 12)]


def test_url_logdir_selects_rewrite_sink(monkeypatch):
    made = []

    class FakeSink:
        def __init__(self, logdir, header, max_file_bytes):
            made.append((logdir, header(), max_file_bytes))
            self.path = logdir + "/events.out.tfevents.fake"
            self.records = []

        def write(self, record):
            self.records.append(record)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metric_writers, "_RewriteSink", FakeSink)
    with TensorBoardWriter("gs://bucket/run", max_file_bytes=123) as writer:
        writer.scalars(4, {"a": 1.0})
    ((logdir, header, size),) = made
    assert logdir == "gs://bucket/run" and size == 123
    assert _parse_event(_read_records(header)[0])["file_version"] == "brain.Event:2"
    assert _parse_event(_read_records(writer._sink.records[0])[0])["step"] == 4


def test_write_scalars_fans_out(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def scalars(self, step, values):
            self.calls.append((step, dict(values)))

    a, b = Recorder(), Recorder()
    write_scalars([a, b], 3, {"x": 1.0})
    assert a.calls == b.calls == [(3, {"x": 1.0})]


# --------------------------------------------------------------------------------------------------------------
# The real TensorBoard reader.
# --------------------------------------------------------------------------------------------------------------


def _accumulate(logdir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_tensorboard_reads_scalars(tmp_path):
    _write(tmp_path)
    acc = _accumulate(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["eval/loss", "train/loss", "train/lr"]
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, values in SCALARS:
        for tag, value in values.items():
            expected.setdefault(tag, []).append((step, _f32(value)))
    for tag, pairs in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == pairs
    assert acc.file_version == 2.0


def test_tensorboard_reads_rolled_over_files(tmp_path):
    with TensorBoardWriter(str(tmp_path), rewrite_on_flush=True, max_file_bytes=150) as writer:
        for step in range(10):
            writer.scalars(step, {"loss": 1.0 / (step + 1)})
            writer.flush()
    assert len(_event_files(tmp_path)) > 1
    acc = _accumulate(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, _f32(1.0 / (s + 1))) for s in range(10)]


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
