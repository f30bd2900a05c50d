"""What jobs write into their workdir: the workdir as a path (local or gs://) and results as strict JSON."""

from __future__ import annotations

import math
import os
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
