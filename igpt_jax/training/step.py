"""The train state, its sharded creation, and the one pure train step.

Shapes first, then sharded creation: `state_layout` (`igpt_jax.models.layout`) runs the initialiser under
`jax.eval_shape` (no allocation), its logical annotations give every leaf a `NamedSharding` through the rules table,
and `create_state` jits the initialiser with those output shardings, so no full copy of the parameters ever sits on
one device. The same abstract state is Orbax's restore target, on any mesh.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from igpt_jax import sharding
from igpt_jax.models import layout as layout_lib
from igpt_jax.models import objectives
from igpt_jax.models.igpt import ModelConfig, init_params


@flax.struct.dataclass
class TrainState:
    """Everything a pretraining step changes. The step's randomness is derived from `step`, so it is not stored."""

    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(model_cfg, rng)  # leaves carry their logical axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


StateLayout = layout_lib.Layout  # abstract: TrainState of ShapeDtypeStructs; shardings: TrainState of shardings


def state_layout(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules) -> StateLayout:
    """Shapes and shardings of the train state on `mesh`, without allocating it."""
    return layout_lib.layout_of(lambda rng: _boxed_state(model_cfg, tx, rng), mesh, rules)


def create_state(
    model_cfg: ModelConfig, tx: optax.GradientTransformation, layout: StateLayout, mesh: Mesh, rules, rng: jax.Array
) -> TrainState:
    """Initialises the train state directly into its shardings."""
    init = jax.jit(lambda r: nn.meta.unbox(_boxed_state(model_cfg, tx, r)), out_shardings=layout.shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    base_rng: jax.Array,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch: loss, gradients, Adam update, metrics.

    With ``accum_steps`` > 1 the batch is split into that many micro-batches whose gradients are summed; each
    micro-batch loss is divided by the full batch's number of scored tokens, so the update is the full batch's
    (the BERT mask and the prefix lengths of a prefix-causal model are drawn once for the full batch).

    Args:
      state: the current `TrainState`.
      batch: {'tokens': int32 [batch, length], ...}.
      model_cfg: the model.
      tx: the optimizer.
      schedule: the learning-rate schedule (for the metric only; `tx` applies it).
      base_rng: the run's key; the step's key is `fold_in(base_rng, step)`.
      accum_steps: gradient-accumulation micro-batches.

    Returns:
      (new state, metrics: loss in nats/token, learning_rate, grad_norm, param_norm, update_norm).
    """
    tokens = batch["tokens"]
    rng = jax.random.fold_in(base_rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    bert_mask, prefix_len = objectives.training_masks(mask_rng, tokens, model_cfg)
    normalizer = jnp.maximum(jnp.sum(objectives.loss_weights(tokens, bert_mask, None, prefix_len)), 1.0)
    deterministic = model_cfg.dropout == 0.0

    def loss_fn(params, micro_tokens, micro_mask, micro_rng, micro_prefix):
        loss, _ = objectives.lm_loss(
            model_cfg, params, micro_tokens, micro_rng, deterministic=deterministic, bert_mask=micro_mask,
            normalizer=normalizer, prefix_len=micro_prefix,
        )
        return loss

    grad_fn = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
        loss, grads = grad_fn(state.params, tokens, bert_mask, dropout_rng, prefix_len)
    else:
        micro = tokens.shape[0] // accum_steps

        def split(x):  # [batch, ...] -> [accum, micro, ...]; micro-batch i takes rows i, i + accum, ... (balanced)
            return None if x is None else jnp.swapaxes(x.reshape((micro, accum_steps) + x.shape[1:]), 0, 1)

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            micro_tokens, micro_mask, micro_prefix, i = xs
            loss, grads = grad_fn(state.params, micro_tokens, micro_mask, jax.random.fold_in(dropout_rng, i),
                                  micro_prefix)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        xs = (split(tokens), split(bert_mask), split(prefix_len), jnp.arange(accum_steps))
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), xs)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "learning_rate": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model_cfg: ModelConfig, rng: jax.Array
              ) -> dict[str, jax.Array]:
    """Summed NLL and token count of a (possibly padded) evaluation batch; sum them over batches for exact means."""
    _, aux = objectives.lm_loss(model_cfg, params, batch["tokens"], rng, example_mask=batch.get("mask"))
    return {"nll_sum": aux["nll_sum"], "count": aux["count"]}


def jitted_train_step(
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    layout: StateLayout,
    batch_shardings: NamedSharding | dict[str, NamedSharding],
    mesh: Mesh,
    *,
    accum_steps: int = 1,
):
    """`train_step` under `jax.jit` as ``(state, batch, base_rng) -> (state, metrics)``: the state's and batch's
    shardings, the state donated. The pretraining loop runs it; the compile job lowers this same function ahead of
    time for a described TPU topology."""
    return jax.jit(
        lambda state, batch, rng: train_step(
            state, batch, model_cfg=model_cfg, tx=tx, schedule=schedule, base_rng=rng, accum_steps=accum_steps
        ),
        in_shardings=(layout.shardings, batch_shardings, sharding.replicated(mesh)),
        out_shardings=(layout.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )



def jit_eval_step(model_cfg: ModelConfig, layout: StateLayout, batch_shardings, mesh: Mesh):
    """`eval_step` jitted with the parameters' and batch's shardings."""
    return jax.jit(
        lambda params, batch, rng: eval_step(params, batch, model_cfg=model_cfg, rng=rng),
        in_shardings=(layout.shardings.params, batch_shardings, sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
