"""Shapes and shardings of a tree of arrays before it exists: the one "abstract state + shardings" idiom.

`layout_of(init, mesh, rules)` runs an initialiser whose leaves carry logical axis names (`nn.LogicallyPartitioned`)
under `jax.eval_shape` (nothing is allocated), maps every leaf's names to a `NamedSharding` through the rules table,
and returns both the shardings and the abstract tree (``ShapeDtypeStruct``s that carry them). The abstract tree is
Orbax's restore target on any mesh; the shardings are `jax.jit`'s ``out_shardings`` for creating the tree in place.
The pretraining state (`igpt_jax.training.step`), the fine-tuning state and a pretrained model's parameters
(`igpt_jax.pretrained.sources`) all take their layout from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from igpt_jax import sharding
from igpt_jax.models.igpt import ModelConfig, init_params


@dataclasses.dataclass(frozen=True)
class Layout:
    """An abstract tree (ShapeDtypeStructs carrying shardings) and its shardings tree (same structure, unboxed)."""

    abstract: Any
    shardings: Any


def layout_of(init: Callable[[jax.Array], Any], mesh: Mesh, rules) -> Layout:
    """The layout of ``init(rng)`` on `mesh`: `init` returns a tree with logical annotations; nothing is allocated."""
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return Layout(abstract=abstract, shardings=shardings)


def param_layout(model_cfg: ModelConfig, mesh: Mesh, rules) -> Layout:
    """Shapes and shardings of the model's parameters on `mesh`."""
    return layout_of(lambda rng: init_params(model_cfg, rng), mesh, rules)


def random_params(model_cfg: ModelConfig, layout: Layout, mesh: Mesh, rules, rng: jax.Array) -> Any:
    """Freshly initialised parameters (e.g. the random-weights baseline), created directly in their shardings."""
    init = jax.jit(lambda r: nn.meta.unbox(init_params(model_cfg, r)), out_shardings=layout.shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng)
