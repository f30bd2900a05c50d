"""A split's token features on disk in bfloat16: what the attentive probe reads, batch by batch.

Token features of every image do not fit in memory (CIFAR-10's 50,000 training images at 16x16, width 128: 3.3 GB
per layer in bfloat16, 6.6 GB in float32), so the probe job writes the chosen feature sets (each probed layer, or
their average) to a ``.npy`` file as the extraction pass produces them and the probe reads random batches back
through a memory map. The file holds the bfloat16 values' bits as uint16 (numpy has no bfloat16 of its own):
[n, sets, length, width]. `to_float32` turns a batch back into float32 (exactly: every bfloat16 is a float32).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def to_bits(x: np.ndarray) -> np.ndarray:
    """float array -> the uint16 bits of its bfloat16 rounding (round to nearest even)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact)."""
    return np.asarray(bits, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


def bits_in_jax(x: jax.Array) -> jax.Array:
    """bfloat16 bits of a JAX float array (inside a jitted function): the extraction pass's output."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def float32_in_jax(bits: jax.Array) -> jax.Array:
    """float32 values of uint16 bfloat16 bits inside a jitted function."""
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)


@dataclasses.dataclass
class TokenStore:
    """One split's token features: ``bits`` uint16 [n, sets, length, width] (a memory map), ``labels`` [n]."""

    path: str
    bits: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.bits.shape[0])

    @property
    def sets(self) -> int:
        return int(self.bits.shape[1])

    def batch(self, index: Sequence[int] | np.ndarray, feature_set: int) -> np.ndarray:
        """uint16 [len(index), length, width] of one feature set (rows read in ascending order)."""
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        rows = np.empty((len(index),) + self.bits.shape[2:], np.uint16)
        rows[order] = self.bits[index[order], feature_set]
        return rows

    @staticmethod
    def nbytes(n: int, sets: int, length: int, width: int) -> int:
        return int(n) * sets * length * width * 2


class StoreWriter:
    """Writes a split's token features row by row (by record index) into a new ``.npy`` memory map.

    The file is complete only after `finish` (which writes a ``.json`` beside it naming the fingerprint); `open_store`
    ignores a file without it, so a stopped job's half-written store is rewritten.
    """

    def __init__(self, path: str, n: int, sets: int, length: int, width: int):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for stale in (path, _done_path(path)):
            if os.path.exists(stale):
                os.remove(stale)
        self.bits = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n, sets, length, width))
        self.labels = np.zeros(n, np.int32)

    def write(self, index: np.ndarray, bits: np.ndarray, labels: np.ndarray) -> None:
        """Rows ``bits`` [k, sets, length, width] of the records ``index`` [k]; records past n are skipped."""
        keep = np.asarray(index) < len(self.labels)
        self.bits[np.asarray(index)[keep]] = bits[keep]
        self.labels[np.asarray(index)[keep]] = labels[keep]

    def finish(self, fingerprint: str) -> TokenStore:
        self.bits.flush()
        np.save(self.path[: -len(".npy")] + ".labels.npy", self.labels)
        with open(_done_path(self.path), "w") as f:
            json.dump({"fingerprint": fingerprint, "shape": list(self.bits.shape)}, f)
        return TokenStore(self.path, self.bits, self.labels)


def _done_path(path: str) -> str:
    return path[: -len(".npy")] + ".json"


def open_store(path: str, fingerprint: str) -> TokenStore | None:
    """The finished store at ``path`` written with ``fingerprint``, read-only; None if absent, unfinished or other."""
    try:
        with open(_done_path(path)) as f:
            done = json.load(f)
        if done.get("fingerprint") != fingerprint:
            return None
        bits = np.load(path, mmap_mode="r")
        labels = np.load(path[: -len(".npy")] + ".labels.npy")
    except (OSError, ValueError):
        return None
    return TokenStore(path, bits, labels)
