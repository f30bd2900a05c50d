"""What jobs write into their workdir: the workdir as a path (local or gs://) and results as strict JSON."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
from etils import epath


def workpath_of(workdir: str) -> epath.Path:
    """The workdir as an `epath.Path`: absolute when local, as given when remote (gs://...)."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary name beside `path`, then renames it: a kill leaves the old file or the new one."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values, tuples as lists, keys as strings, NaN/inf as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x


SEGMENTS = "segments.json"


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
