"""Attention kernels for the iGPT decoder.

All functions take and return heads-last tensors: q, k, v are [batch, length, heads, head_dim] and the result
has q's shape. Scores are scaled by 1/sqrt(head_dim) and the softmax runs in float32 whatever the compute dtype.

Implementations (chosen by `ModelConfig.attention`):
  * ``dense``: a hand-written masked softmax. Simple, exact, and faster on CPU than
    `jax.nn.dot_product_attention` (see ../shared/STACK.md).
  * ``blockwise``: causal attention in query blocks; block i attends only to keys of blocks 0..i, so the masked
    upper triangle is never computed and the full [T, T] score matrix never exists. The default on CPU for the
    autoregressive objective.
  * ``xla`` / ``cudnn``: `jax.nn.dot_product_attention` with that implementation (cuDNN flash attention on GPU).
  * ``auto``: ``cudnn`` on GPU with a 16-bit compute dtype, ``blockwise`` for causal attention on CPU when the
    length divides into blocks, ``dense`` otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "xla", "cudnn")

_NEG_INF = -1e30  # finite, so fully masked rows (never produced here) cannot turn into NaN


def _scale(q: jax.Array) -> jax.Array:
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    """Masked-softmax attention over the whole sequence.

    Args:
      q: queries [batch, q_len, heads, head_dim].
      k: keys [batch, kv_len, heads, head_dim].
      v: values [batch, kv_len, heads, head_dim].
      causal: if True, query i attends to keys j <= i + (kv_len - q_len) (queries are the last q_len positions).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", _scale(q), k, preferred_element_type=jnp.float32)
    if causal:
        q_len, kv_len = q.shape[1], k.shape[1]
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        allowed = q_pos >= jnp.arange(kv_len)[None, :]
        scores = jnp.where(allowed, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int) -> jax.Array:
    """Causal self-attention computed block by block, skipping the masked upper triangle.

    The sequence is cut into ``n = length // block_size`` blocks. Query block i attends to key blocks 0..i: the
    strictly-lower blocks need no mask, the diagonal block gets a triangular one. The loop over query blocks is
    unrolled at trace time, so each block is a fixed-shape matmul that XLA schedules well on CPU; the work is
    about (n + 1) / (2n) of dense attention and no [length, length] matrix is ever built.

    Args:
      q, k, v: [batch, length, heads, head_dim], the same length (self-attention).
      block_size: query/key block length; must divide the length.

    Returns:
      [batch, length, heads, head_dim] in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    if length % block_size:
        raise ValueError(f"blockwise attention: sequence length {length} is not a multiple of block_size {block_size}")
    n = length // block_size
    q = _scale(q)
    tri = jnp.tril(jnp.ones((block_size, block_size), dtype=bool))
    outputs = []
    for i in range(n):
        lo, hi = i * block_size, (i + 1) * block_size
        qi = q[:, lo:hi]  # [b, B, h, d]
        kc, vc = k[:, :hi], v[:, :hi]  # [b, (i+1)B, h, d]
        scores = jnp.einsum("bqhd,bkhd->bhqk", qi, kc, preferred_element_type=jnp.float32)
        # Only the last key block (the diagonal one) needs masking.
        allowed = jnp.concatenate([jnp.ones((block_size, lo), dtype=bool), tri], axis=1)
        scores = jnp.where(allowed, scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outputs.append(jnp.einsum("bhqk,bkhd->bqhd", probs, vc))
    return jnp.concatenate(outputs, axis=1)


def jax_dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, implementation: str | None
) -> jax.Array:
    """`jax.nn.dot_product_attention` ('xla' or 'cudnn'), which takes the same [b, t, h, d] layout."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def resolve_implementation(name: str, *, causal: bool, length: int, block_size: int, dtype: jnp.dtype) -> str:
    """Turns ``auto`` into a concrete implementation for the current backend and shapes."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if backend == "cpu" and causal and length % block_size == 0 and length > block_size:
        return "blockwise"
    return "dense"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    implementation: str = "auto",
    block_size: int = 128,
) -> jax.Array:
    """Dispatches to the configured attention implementation (see module docstring)."""
    impl = resolve_implementation(implementation, causal=causal, length=q.shape[1], block_size=block_size, dtype=q.dtype)
    if impl == "dense":
        return dense_attention(q, k, v, causal=causal)
    if impl == "blockwise":
        if not causal:
            return dense_attention(q, k, v, causal=False)
        if q.shape[1] != k.shape[1]:
            return dense_attention(q, k, v, causal=True)
        return blockwise_causal_attention(q, k, v, block_size=block_size)
    return jax_dot_product_attention(q, k, v, causal=causal, implementation=impl)


__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "blockwise_causal_attention",
    "dense_attention",
    "jax_dot_product_attention",
    "resolve_implementation",
]
