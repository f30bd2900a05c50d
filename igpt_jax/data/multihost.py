"""Multi-host input: which rows of every global batch a process loads, and the global arrays made from them.

A global batch is sharded over the mesh's batch axes (``data``, ``fsdp``). `host_rows` asks the mesh which rows this
process's devices hold (`rows_by_process` answers for every process, e.g. for a whole pod in the AOT compile job);
`iterators.make_iterator` reads exactly those rows of each global batch, and `make_global_batch` puts them on the
local devices as one global `jax.Array`. Rows need not be adjacent (a topology-aware TPU mesh may give a host batch
shards 0 and 8), and on pods with more hosts than examples per step several processes hold, and load, the same rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class HostRows:
    """The rows of every global batch of `global_batch` examples that one process loads (sorted, distinct)."""

    global_batch: int
    rows: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        """'0:3', or '0:1,8:9' for rows in several ranges."""
        ranges, start = [], self.rows[0]
        for prev, row in zip(self.rows, self.rows[1:] + (None,)):
            if row is None or row != prev + 1:
                ranges.append(f'{start}:{prev + 1}')
                start = row
        return ','.join(ranges)

    def local_slice(self, start: int, stop: int) -> slice:
        """Global rows [start, stop) (all held here) -> their positions in this process's local batch."""
        local = int(np.searchsorted(self.rows, start))
        if stop <= start or self.rows[local:local + stop - start] != tuple(range(start, stop)):
            raise ValueError(f'A local device needs rows {start}:{stop} but this process loaded rows {self} of the '
                             f'global batch of {self.global_batch}.')
        return slice(local, local + stop - start)


def host_rows(
    global_batch: int,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    *,
    process_index: int | None = None,
) -> HostRows:
    """The rows of a global batch that this process's devices hold when it is sharded over `batch_axes`.

    With at least one example per process these are the process's own disjoint rows (not always adjacent: a
    topology-aware TPU mesh may give a host's chips batch shards 0 and 8). On pods with more hosts
    than examples per step (e.g. a batch of 64 on 128 hosts, where a model-parallel axis spans two hosts)
    several processes hold the same rows: each loads them (every process cuts the same global batches) and
    `make_global_batch` places them on its devices.

    Args:
      global_batch: examples per global batch.
      mesh: the device mesh.
      batch_axes: mesh axes the batch is split over (axes not in the mesh are skipped).
      process_index: the process (default: this one).

    Raises:
      ValueError: see `rows_by_process`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    by_process = rows_by_process(global_batch, mesh, batch_axes)
    if process_index not in by_process:
        raise ValueError(f'Process {process_index} has no device in mesh {dict(mesh.shape)}.')
    return by_process[process_index]


def rows_by_process(
    global_batch: int,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    process_of: Any = None,
) -> dict[int, HostRows]:
    """`host_rows` of every process of the mesh (the AOT compile job reports it for a whole pod).

    Args:
      global_batch, mesh, batch_axes: as for `host_rows`.
      process_of: device -> process index (default ``device.process_index``); lets tests emulate hosts.

    Raises:
      ValueError: the batch does not divide over the batch axes.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    n_shards = math.prod(mesh.shape[a] for a in axes)
    if global_batch < 1 or global_batch % n_shards:
        raise ValueError(f'Global batch {global_batch} does not divide over the {n_shards} shards of mesh axes '
                         f'{axes} (mesh {dict(mesh.shape)}).')
    process_of = process_of or (lambda d: d.process_index)
    held: dict[int, set[tuple[int, int]]] = {}
    index_map = NamedSharding(mesh, PartitionSpec(axes)).devices_indices_map((global_batch,))
    for device, index in index_map.items():
        held.setdefault(process_of(device), set()).add(index[0].indices(global_batch)[:2])
    return {process: HostRows(global_batch, tuple(sorted({r for a, b in ranges for r in range(a, b)})))
            for process, ranges in sorted(held.items())}


def make_global_batch(
    local_batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    rows: HostRows | None = None,
) -> dict[str, jax.Array]:
    """Per-process batches -> global arrays sharded on the leading dim over `batch_axes`.

    Axes of `batch_axes` that the mesh does not have are skipped. Without `rows` the global batch is inferred by
    JAX (the concatenation of the processes' disjoint batches); with `rows` (from :func:`host_rows`) the local
    batch holds those rows of the global batch and every local device takes its shard from them, which also
    works when processes share rows.

    Raises:
      ValueError: no batch axis in the mesh, or a batch that does not divide
        evenly over the batch axes.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f'None of the batch axes {batch_axes} is in the mesh axes {mesh.axis_names}.')
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    n_shards = math.prod(mesh.shape[a] for a in axes)
    # Devices along the batch axes that live on this process: the local batch splits over them.
    local_devices = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if rows is not None:
            if value.shape[0] != rows.size:
                raise ValueError(f'Batch field {key!r}: {value.shape[0]} rows, expected rows {rows} of the global '
                                 f'batch of {rows.global_batch}.')
            out[key] = jax.make_array_from_callback(
                (rows.global_batch, *value.shape[1:]), sharding,
                lambda index, value=value: value[_local_rows(index, rows)])
            continue
        global_rows = value.shape[0] * jax.process_count()
        if value.shape[0] == 0 or global_rows % n_shards:
            raise ValueError(
                f'Batch field {key!r}: {value.shape[0]} rows per process x {jax.process_count()} processes '
                f'does not divide over {n_shards} shards of mesh axes {axes} ({len(local_devices)} local devices).')
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _local_rows(index: tuple[slice, ...], rows: HostRows) -> tuple[slice, ...]:
    """A device's index into the global batch -> the same rows of this process's local batch."""
    start, stop, _ = index[0].indices(rows.global_batch)
    return (rows.local_slice(start, stop), *index[1:])
