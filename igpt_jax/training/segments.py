"""A resumable job's wall time over its invocations (``segments.json``), so that a resumed job reports the whole
job's time."""

from __future__ import annotations

import json
import time

from etils import epath

from igpt_jax.workdir import SEGMENTS, write_atomic


class Segments:
    """A resumable job's wall time over its invocations, kept in ``{workdir}/segments.json``.

    One record per invocation, ``{"from_step", "to_step", "seconds"}`` as of its last `save` (made with each
    checkpoint, and at the end), so a resumed job reports the time of the whole job, not of its last segment. Time a
    stop lost (steps after the last checkpoint, redone later) is counted: it was spent. A job resumed from a
    workdir written before this file existed starts its records at the resumed step.

    Args:
      workpath: the job's workdir.
      start_step: the step this invocation starts from.
      resumed: whether it resumes a checkpoint (else earlier records, from a run that left no checkpoint, are
        dropped).
      writer: whether this process writes the file (process 0).
      t_start: when this invocation started (default: now).
    """

    def __init__(self, workpath: epath.Path, *, start_step: int, resumed: bool, writer: bool = True,
                 t_start: float | None = None):
        self.path = workpath / SEGMENTS
        self.start_step, self.writer = start_step, writer
        self.t_start = time.time() if t_start is None else t_start
        self.earlier: list[dict[str, float]] = (
            json.loads(self.path.read_text()) if resumed and self.path.exists() else [])

    def records(self, step: int) -> list[dict[str, float]]:
        """The earlier invocations' records and this one's, up to `step`."""
        return self.earlier + [{"from_step": self.start_step, "to_step": step, "seconds": time.time() - self.t_start}]

    def save(self, step: int) -> list[dict[str, float]]:
        """Writes the records up to `step` (process 0) and returns them."""
        records = self.records(step)
        if self.writer:
            write_atomic(self.path, json.dumps(records).encode())
        return records


def total_seconds(records: list[dict[str, float]]) -> float:
    return sum(r["seconds"] for r in records)
