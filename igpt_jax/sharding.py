"""The device mesh and the one logical-axis rules table.

The model names every parameter and activation dimension logically ('embed', 'heads', 'activation_batch', ...);
`DEFAULT_RULES` maps those names to the mesh axes ('data', 'fsdp', 'tensor'). Changing the parallelism is a config
edit (`config.mesh.shape`, `config.mesh.rules`), never a model edit:

  * data:   pure data parallelism (parameters replicated).
  * fsdp:   data parallelism whose parameters and optimizer state are sharded along 'embed' (ZeRO-3 style).
  * tensor: Megatron-style model parallelism over heads, MLP width and vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
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
    """Fills one -1 in a ('data', 'fsdp', 'tensor') shape and checks the product equals the device count.

    Raises:
      ValueError: with the numbers, when the shape cannot fit the devices.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
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
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh, topology-aware on TPU, with automatic sharding axes."""
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
