"""The device mesh and the one logical-axis rules table.

The model names every parameter and activation dimension logically ('embed', 'heads', 'activation_batch', ...);
`DEFAULT_RULES` maps those names to the mesh axes ('data', 'fsdp', 'context', 'tensor'). Changing the parallelism is
a config edit (`config.mesh.shape`, `config.mesh.rules`), never a model edit:

  * data:    pure data parallelism (parameters replicated).
  * fsdp:    data parallelism whose parameters and optimizer state are sharded along 'embed' (ZeRO-3 style).
  * context: sequence (context) parallelism: each example's tokens are split over it ('activation_length'); the
             queries stay split, keys and values are gathered whole ('activation_kv_length' is unsharded).
  * tensor:  Megatron-style model parallelism over heads, MLP width and vocabulary.

`config.mesh.shape` has four entries (data, fsdp, context, tensor) or, as before the context axis, three
(data, fsdp, tensor) with context 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
LEGACY_MESH_AXES = ("data", "fsdp", "tensor")  # a 3-entry mesh.shape: context 1
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", "context"),  # queries and the residual stream: split over the context axis
    ("activation_kv_length", None),  # keys and values: gathered whole (and the sampler's cache)
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("position", None),
    ("classes", None),
)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table from a config (lists become tuples) and checks its mesh axes."""
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"mesh.rules entry {entry!r} must be a (logical_name, mesh_axes) pair")
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one -1 in a (data, fsdp, context, tensor) shape and checks the product equals the device count.

    A 3-entry shape is (data, fsdp, tensor) with context 1.

    Raises:
      ValueError: with the numbers, when the shape cannot fit the devices.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (len(MESH_AXES), len(LEGACY_MESH_AXES)):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES} "
                         f"(or 3 for {LEGACY_MESH_AXES}, context 1)")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape} may contain at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={shape} does not fit {num_devices} devices: the fixed axes multiply to {known}, "
                f"which does not divide {num_devices}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape={shape} has {math.prod(shape)} devices but {num_devices} are available "
            f"({jax.default_backend()}); use -1 for one axis to fill the rest"
        )
    return shape[:2] + (1,) + shape[2:] if len(shape) == len(LEGACY_MESH_AXES) else shape


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'context', 'tensor') mesh, topology-aware on TPU, with automatic sharding axes."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError):
        # Devices without a physical topology (e.g. a described TPU topology's subset): plain reshape.
        return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES, axis_types=axis_types)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree whose leaves carry logical names (`nn.LogicallyPartitioned` boxes)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def mesh_axes_of(logical_name: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (first matching rule), as a tuple."""
    for name, axes in rules:
        if name == logical_name:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, tuple) else (axes,)
    return ()


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """Mesh axes that the batch dimension is split over."""
    return mesh_axes_of("activation_batch", rules)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the global batch is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, ...] inputs: the leading dimension over the batch axes."""
    return NamedSharding(mesh, P(batch_axes(rules) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divides(global_batch: int, mesh: Mesh, rules: Rules, *, what: str = "train.batch_size") -> None:
    """Fails fast, with the numbers, when a global batch cannot be split over the data-parallel axes."""
    dp = data_parallel_size(mesh, rules)
    if global_batch <= 0:
        raise ValueError(f"{what}={global_batch} must be positive")
    if global_batch % dp:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}, batch split over {batch_axes(rules)})"
        )
