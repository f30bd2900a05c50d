"""What a probe job has finished, kept in its workdir so that a stopped job resumes from there.

Pieces, in ``{workdir}/progress/``, each written atomically (to a temporary name, then renamed) as soon as it is done:
  * ``features-{model}-{split}.npz``: a split's features, labels, record indices, tokens and loss
    (model: ``step{N}`` for a checkpoint, ``random`` for the random-weights baseline);
  * ``result-{name}.json``: a fitted probe's results (``step{N}``, ``raw_pixels``, ``random_init``).
Each piece also keeps the seconds it took, so a resumed job's ``seconds`` counts the work it reused
(``reused_seconds``). Each piece carries the fingerprint of everything that determines it (checkpoint directory and
step, model, data, layers, masks, seed; for results also the solver settings); a piece whose fingerprint differs is
ignored and overwritten, so a rerun with other settings recomputes exactly what they change. SIGTERM or SIGKILL loses
only the piece in progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from igpt_jax import workdir as workdir_files
from igpt_jax.probing import features as features_lib
from igpt_jax.workdir import jsonable, write_atomic


def fingerprint(identity: Any) -> str:
    """A short hash of a JSON-able description (keys sorted)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ProbeProgress:
    """Saves and finds a probe job's finished pieces (see the module docstring).

    Args:
      workdir: the probe job's workdir.
      enabled: False: nothing is read or written.
      writer: whether this process writes (process 0); every process reads.
    """

    def __init__(self, workdir: epath.Path, *, enabled: bool = True, writer: bool = True):
        self.directory = workdir / workdir_files.PROBE_PROGRESS
        self.enabled = enabled
        self.writer = writer and enabled
        self.reused: list[str] = []  # names of the pieces found, in order
        self.reused_seconds = 0.0  # the time the pieces found took when they were computed

    def _path(self, name: str) -> epath.Path:
        return self.directory / name

    def load_features(self, name: str, fp: str) -> features_lib.SplitFeatures | None:
        """The split features saved under ``name`` with fingerprint ``fp``, else None."""
        path = self._path(f"features-{name}.npz")
        if not self.enabled or not path.exists():
            return None
        try:
            with np.load(io.BytesIO(path.read_bytes())) as z:
                if str(z["fingerprint"]) != fp:
                    logging.info("probe progress: %s is from other settings; recomputing it", path)
                    return None
                out = features_lib.SplitFeatures(features=z["features"], labels=z["labels"], index=z["index"],
                                                 tokens=z["tokens"], loss=float(z["loss"]))
                seconds = float(z["seconds"]) if "seconds" in z else 0.0  # pieces saved before it was kept: 0
        except (OSError, ValueError, KeyError) as e:  # a damaged file: recompute
            logging.warning("probe progress: cannot read %s (%s); recomputing it", path, e)
            return None
        self.reused.append(f"features-{name}")
        self.reused_seconds += seconds
        return out

    def save_features(self, name: str, fp: str, split: features_lib.SplitFeatures, seconds: float = 0.0) -> None:
        if not self.writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(fp), features=split.features, labels=split.labels, index=split.index,
                 tokens=split.tokens, loss=np.array(split.loss), seconds=np.array(seconds))
        write_atomic(self._path(f"features-{name}.npz"), buf.getvalue())

    def load_result(self, name: str, fp: str) -> dict[str, Any] | None:
        """The results saved under ``name`` with fingerprint ``fp``, else None."""
        path = self._path(f"result-{name}.json")
        if not self.enabled or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            logging.warning("probe progress: cannot read %s (%s); recomputing it", path, e)
            return None
        if saved.get("fingerprint") != fp:
            return None
        self.reused.append(f"result-{name}")
        self.reused_seconds += float(saved.get("seconds", 0.0))
        return saved["result"]

    def save_result(self, name: str, fp: str, result: dict[str, Any], seconds: float = 0.0) -> None:
        if not self.writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        saved = {"fingerprint": fp, "result": result, "seconds": seconds}
        write_atomic(self._path(f"result-{name}.json"), json.dumps(saved).encode())

    def result_or_compute(self, name: str, fp: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The result saved under ``name`` with fingerprint ``fp``, else ``compute()`` (made JSON-ready) and saved."""
        found = self.load_result(name, fp)
        if found is not None:
            logging.info("probe: %s reused from %s", name, self.directory)
            return found
        t0 = time.time()
        result = jsonable(compute())
        self.save_result(name, fp, result, seconds=time.time() - t0)
        return result
