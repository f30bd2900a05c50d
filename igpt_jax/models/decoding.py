"""Sampling from the autoregressive iGPT with a key/value cache (the image grids are in `igpt_jax.reports.images`).

Decoding runs the model's own modules (`igpt_jax.models.igpt.IGPT` with ``decode=True``): the same embeddings,
projections, norms, MLP and attention function as training, on the same parameters, with every layer's keys and
values kept in the Flax "cache" collection (`igpt_jax.models.igpt.init_cache`: the next position and one [batch, heads,
n_ctx, head_dim] key and value array per layer). Every step is
``IGPT(cfg).apply({"params": params, "cache": cache}, inputs, decode=True, mutable=["cache"])``, with the block
parameters split per layer once before the loop (`igpt_jax.models.igpt.split_layers`):

  * `prefill` feeds SOS and a prefix of t tokens (the inputs of positions 0..t) in one call: causal attention
    over the prefix, their keys/values written to the cache; position t's logits give the first new token x_t.
  * `decode_step` feeds one token x_{i-1} as the input of the cache's next position i, which attends to the cached
    positions 0..i, and returns position i's logits (for x_i).
  * `generate` does one prefill and then a ``lax.fori_loop`` of decode steps inside one jitted function, sampling
    each token with temperature / top-k from a per-position key (``fold_in(rng, position)``), so a given seed gives
    the same images on any mesh. `generate_recompute` is the cache-free reference: the full forward pass over the
    whole sequence for every new token (for tests and the benchmark).

Cached logits equal the full forward pass's (tests/test_sampling.py checks 1e-5 in float32 at every position).
Under a mesh and rules context the cache shards like the activations (batch over the data axes, heads over
'tensor'), never along the positions, also under sequence parallelism (decoding drops the 'activation_length'
rule; a decode step has one position).

Only the autoregressive objective can be sampled; a BERT model raises a ValueError.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import sharding
from igpt_jax.models import igpt as model_lib
from igpt_jax.models.igpt import IGPT, ModelConfig


# ----------------------------------------------------------------------------------------------- checks
def check_sampling_args(cfg: ModelConfig, *, prefix_length: int, length: int | None = None,
                        temperature: float = 1.0, top_k: int = 0) -> int:
    """Validates the sampling settings against the model before anything is compiled; returns the length.

    Args:
      cfg: the model.
      prefix_length: number of given tokens t (0 = unconditional, from SOS only).
      length: total tokens per sample (default n_ctx).
      temperature: >= 0; 0 means greedy (argmax).
      top_k: 0 (off) or 1..vocab_size.

    Raises:
      ValueError: naming the offending setting.
    """
    if cfg.objective != "ar":
        raise ValueError(
            f"model.objective={cfg.objective!r}: only autoregressive ('ar') models can be sampled; a BERT model has "
            "no left-to-right distribution"
        )
    length = cfg.n_ctx if length is None else int(length)
    if not 1 <= length <= cfg.n_ctx:
        raise ValueError(f"sample length {length} must lie in [1, n_ctx={cfg.n_ctx}] (the model's context)")
    if prefix_length < 0:
        raise ValueError(f"prefix length {prefix_length} is negative")
    if prefix_length > cfg.n_ctx:
        raise ValueError(f"prefix of {prefix_length} tokens is longer than the model's context n_ctx={cfg.n_ctx}")
    if prefix_length > length:
        raise ValueError(f"prefix of {prefix_length} tokens is longer than the sample length {length}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = off)")
    if top_k > cfg.vocab_size:
        raise ValueError(f"top_k={top_k} is larger than the vocabulary ({cfg.vocab_size} colours)")
    return length


# ------------------------------------------------------------------------------------------------ cache
def init_cache(cfg: ModelConfig, batch: int) -> Any:
    """An empty decode cache for `batch` sequences of up to n_ctx positions (`igpt_jax.models.igpt.init_cache`)."""
    return model_lib.init_cache(cfg, batch)


def _decode(cfg: ModelConfig, params: Any, cache: Any, inputs: jax.Array) -> tuple[jax.Array, Any]:
    """The model on the inputs [batch, t] of the cache's next t positions: (float32 logits [b, t, vocab], cache)."""
    out, variables = IGPT(cfg).apply({"params": nn.meta.unbox(params), "cache": cache}, inputs.astype(jnp.int32),
                                     decode=True, mutable=["cache"])
    return out.logits, variables["cache"]


def prefill(cfg: ModelConfig, params: Any, prefix: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """Runs SOS and a prefix of t tokens (positions 0..t) through the model in one call, filling the cache.

    Args:
      cfg: the model (objective 'ar').
      params: its parameters (boxed or plain).
      prefix: int [batch, t] given tokens x_0..x_{t-1}, 0 <= t < n_ctx (t = 0: SOS only).
      cache: an empty one, from `init_cache`.

    Returns:
      (float32 logits [batch, t + 1, vocab] of positions 0..t, the cache holding positions 0..t).
    """
    t = prefix.shape[1]
    if t >= cfg.n_ctx:
        raise ValueError(f"prefill of a prefix of {t} tokens needs {t + 1} positions, more than n_ctx={cfg.n_ctx}")
    inputs = jnp.pad(prefix.astype(jnp.int32), ((0, 0), (1, 0)))  # position p takes x_{p-1}; p = 0: SOS
    return _decode(cfg, params, cache, inputs)


def decode_step(cfg: ModelConfig, params: Any, cache: Any, prev_token: jax.Array) -> tuple[jax.Array, Any]:
    """One cached step: the cache's next position i (>= 1) takes the previous token x_{i-1} as its input.

    Args:
      cfg: the model.
      params: its parameters.
      cache: holding positions 0..i-1.
      prev_token: int [batch], the token x_{i-1}.

    Returns:
      (float32 logits [batch, vocab] of position i, i.e. the distribution of x_i; the cache holding 0..i).
    """
    logits, cache = _decode(cfg, params, cache, prev_token[:, None])
    return logits[:, 0], cache


# --------------------------------------------------------------------------------------------- sampling
def sample_logits(rng: jax.Array, logits: jax.Array, *, temperature: float, top_k: int) -> jax.Array:
    """One token per row of float logits [batch, vocab]: argmax when temperature is 0, else top-k then categorical.

    Top-k keeps the k largest logits of each row (ties with the k-th are kept) and masks the rest.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(cfg: ModelConfig, params: Any, prefix: jax.Array, rng: jax.Array, *, length: int | None = None,
             temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Completes each prefix to `length` tokens: one prefill, then a `lax.fori_loop` of cached decode steps.

    Pure and jittable (with cfg, length, temperature and top_k static). The token at position i is drawn with
    ``fold_in(rng, i)``.

    Args:
      cfg: the model (objective 'ar').
      params: its parameters.
      prefix: int [batch, t] given tokens; t = 0 for unconditional samples (from SOS).
      rng: a PRNG key.
      length: tokens per sample (default n_ctx).
      temperature: 0 = greedy.
      top_k: 0 = off.

    Returns:
      int32 [batch, length]: the prefix followed by the sampled tokens.
    """
    batch, t = prefix.shape
    length = check_sampling_args(cfg, prefix_length=t, length=length, temperature=temperature, top_k=top_k)
    prefix = prefix.astype(jnp.int32)
    if t == length:
        return prefix
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    params = model_lib.split_layers(params)  # once, outside the loop
    logits, cache = prefill(cfg, params, prefix, init_cache(cfg, batch))
    tokens = jnp.zeros((batch, length), jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, prefix, 0, axis=1)
    tokens = tokens.at[:, t].set(sample(jax.random.fold_in(rng, t), logits[:, -1]))

    def body(position, carry):
        tokens, cache = carry
        prev = jax.lax.dynamic_index_in_dim(tokens, position - 1, axis=1, keepdims=False)
        logits, cache = decode_step(cfg, params, cache, prev)  # the cache's next position is `position`
        new = sample(jax.random.fold_in(rng, position), logits)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, position, axis=1)
        # Positions are never split while decoding ('activation_kv_length' is unsharded, see the module docstring).
        return nn.with_logical_constraint(tokens, ("activation_batch", "activation_kv_length")), cache

    tokens, _ = jax.lax.fori_loop(t + 1, length, body, (tokens, cache))
    return tokens


def generate_recompute(cfg: ModelConfig, params: Any, prefix: jax.Array, rng: jax.Array, *,
                       length: int | None = None, temperature: float = 1.0, top_k: int = 0,
                       num_steps: int | None = None) -> jax.Array:
    """The cache-free reference of `generate`: the full forward pass over all `length` positions per new token.

    Same sampling and keys as `generate`, so with equal logits it draws the same tokens. ``num_steps`` stops after
    that many new tokens (the benchmark times a few steps of this slow path).
    """
    batch, t = prefix.shape
    length = check_sampling_args(cfg, prefix_length=t, length=length, temperature=temperature, top_k=top_k)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    params = nn.meta.unbox(params)
    model = IGPT(cfg)
    tokens = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((batch, length), jnp.int32),
                                                 prefix.astype(jnp.int32), 0, axis=1)
    stop = length if num_steps is None else min(length, t + int(num_steps))

    def body(position, tokens):
        logits = model.apply({"params": params}, tokens).logits  # position p sees tokens < p only (causal)
        logits = jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
        new = sample(jax.random.fold_in(rng, position), logits)
        return jax.lax.dynamic_update_index_in_dim(tokens, new, position, axis=1)

    return jax.lax.fori_loop(t, stop, body, tokens)


def make_generate_fn(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules, param_shardings: Any, *,
                     length: int | None = None, temperature: float = 1.0, top_k: int = 0,
                     recompute: bool = False) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`generate` jitted on a mesh: parameters on their shardings, prefixes and samples split over the batch axes.

    Returns:
      fn(params, prefix [batch, t], rng) -> int32 [batch, length], the batch divisible by the data-parallel size.
    """
    check_sampling_args(cfg, prefix_length=0, length=length, temperature=temperature, top_k=top_k)
    body = generate_recompute if recompute else generate
    batch_sharding = sharding.batch_sharding(mesh, rules)
    fn = jax.jit(
        lambda params, prefix, rng: body(cfg, params, prefix, rng, length=length, temperature=temperature,
                                         top_k=top_k),
        in_shardings=(param_shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=batch_sharding,
    )

    def call(params, prefix, rng):
        check_sampling_args(cfg, prefix_length=prefix.shape[1], length=length, temperature=temperature, top_k=top_k)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(params, prefix, rng)

    return call
