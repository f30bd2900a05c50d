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

import functools
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


def _check_block(length: int, block_size: int) -> int:
    """The block length actually used: ``block_size`` capped at the sequence length; it must divide the length."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"blockwise attention: block_size must be a positive integer, got {block_size!r}")
    block = min(block_size, length)
    if length % block:
        raise ValueError(
            f"blockwise attention: sequence length {length} is not a multiple of block_size {block_size}; "
            f"choose a block size that divides it (or attention='dense')"
        )
    return block


def _visible_t(block: int, lo: int) -> jax.Array:
    """Causal visibility, keys first: [lo + block, block], True where key <= query, for the queries
    [lo, lo + block) and the keys [0, lo + block). Only the last (diagonal) key block is triangular."""
    return jnp.concatenate([jnp.ones((lo, block), bool), jnp.triu(jnp.ones((block, block), bool))], axis=0)


def _scores_t(q_blk: jax.Array, k: jax.Array, lo: int, block: int, causal: bool) -> jax.Array:
    """Masked scores of one query block, keys first: [b, h, keys, B] float32 (keys: all, or 0..lo+block-1)."""
    keys = lo + block if causal else k.shape[2]  # causal: later keys are masked for every query of the block
    scores_t = jnp.einsum("bhkd,bhqd->bhkq", k[:, :, :keys], q_blk, preferred_element_type=jnp.float32)
    if causal:
        scores_t = jnp.where(_visible_t(block, lo), scores_t, _NEG_INF)
    return scores_t


def _blockwise_forward(q, k, v, block: int, causal: bool):
    """Output [b, h, t, d] and, per query block, exp(scores - row max) [b, h, keys, B], max and sum [b, h, 1, B]."""
    v_t = jnp.swapaxes(v, 2, 3)  # [b, h, d, t]
    outputs, weights, maxes, sums = [], [], [], []
    for lo in range(0, q.shape[2], block):
        scores_t = _scores_t(q[:, :, lo : lo + block], k, lo, block, causal)
        row_max = jnp.max(scores_t, axis=2, keepdims=True)
        unnormalised = jnp.exp(scores_t - row_max).astype(v.dtype)
        total = jnp.sum(unnormalised, axis=2, keepdims=True, dtype=jnp.float32)
        keys = unnormalised.shape[2]
        out_t = jnp.einsum("bhdk,bhkq->bhdq", v_t[..., :keys], unnormalised, preferred_element_type=jnp.float32)
        outputs.append((out_t / total).astype(q.dtype))  # normalise the [d, B] output, not the [keys, B] weights
        weights.append(unnormalised), maxes.append(row_max), sums.append(total)
    out = jnp.swapaxes(jnp.concatenate(outputs, axis=3), 2, 3)
    return out, weights, maxes, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blockwise_bhtd(q, k, v, block: int, causal: bool, save_weights: bool):
    """Softmax attention over [batch, heads, length, head_dim] (q already scaled), one query block at a time."""
    del save_weights
    return _blockwise_forward(q, k, v, block, causal)[0]


def _blockwise_fwd(q, k, v, block, causal, save_weights):
    out, weights, maxes, sums = _blockwise_forward(q, k, v, block, causal)
    if save_weights:
        return out, (q, k, v, out, weights, sums)
    lse = jnp.concatenate([m + jnp.log(s) for m, s in zip(maxes, sums)], axis=3)  # [b, h, 1, t]
    return out, (q, k, v, out, lse)


def _blockwise_bwd(block, causal, save_weights, residuals, d_out):
    """Backward pass, block by block, in the same keys-first score layout as the forward pass.

    Keys first ([keys, queries] blocks) because then every matmul of the backward pass (dk = ds^T q, dv = p^T do,
    dq^T = k^T ds^T) and of the forward pass (out^T = v^T p) is a plain row-major product, which XLA:CPU hands to
    its fast matmul library; with queries first, autodiff's transposed products became loops costing 3-8x as much
    (bench/RESULTS.md). The weights come from the forward pass (``save_weights``) or are recomputed from the saved
    log-sum-exp (flash-attention style: no O(length^2) residuals).
    """
    if save_weights:
        q, k, v, out, weights, sums = residuals
    else:
        q, k, v, out, lse = residuals
    f32 = jnp.float32
    length = q.shape[2]
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)[:, :, None, :]  # [b, h, 1, t]: rowsum(dO * O)
    k_t = jnp.swapaxes(k, 2, 3)  # [b, h, d, t]
    dq_t, dk_parts, dv_parts = [], [], []
    for i, lo in enumerate(range(0, length, block)):
        hi = lo + block
        q_blk, do_blk = q[:, :, lo:hi], d_out[:, :, lo:hi]
        if save_weights:  # p = weights * inv_sum, never materialised: the 1/sum scale goes on the small operands
            probs_t, inv_sum = weights[i], 1.0 / sums[i]  # [b, h, keys, B], [b, h, 1, B]
            do_scaled = (do_blk * jnp.swapaxes(inv_sum, 2, 3)).astype(v.dtype)
        else:
            scores_t = _scores_t(q_blk, k, lo, block, causal)
            probs_t, inv_sum = jnp.exp(scores_t - lse[..., lo:hi]).astype(v.dtype), None
            do_scaled = do_blk
        keys = probs_t.shape[2]
        dprobs_t = jnp.einsum("bhkd,bhqd->bhkq", v[:, :, :keys], do_blk, preferred_element_type=f32)
        centred = dprobs_t - delta[..., lo:hi]
        dscores_t = (probs_t * (centred if inv_sum is None else centred * inv_sum)).astype(q.dtype)
        dv_parts.append(jnp.einsum("bhkq,bhqd->bhkd", probs_t, do_scaled, preferred_element_type=f32))
        dk_parts.append(jnp.einsum("bhkq,bhqd->bhkd", dscores_t, q_blk, preferred_element_type=f32))
        dq_t.append(jnp.einsum("bhdk,bhkq->bhdq", k_t[..., :keys], dscores_t, preferred_element_type=f32))

    def total(parts):  # causal: block i's part covers keys [0, (i + 1) * block)
        padded = [jnp.pad(p, ((0, 0), (0, 0), (0, length - p.shape[2]), (0, 0))) for p in parts]
        return functools.reduce(jnp.add, padded)

    dq = jnp.swapaxes(jnp.concatenate(dq_t, axis=3), 2, 3)
    return dq.astype(q.dtype), total(dk_parts).astype(k.dtype), total(dv_parts).astype(v.dtype)


_blockwise_bhtd.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, block_size: int, save_weights: bool = True
) -> jax.Array:
    """Self-attention computed one query block at a time, with a hand-written blockwise backward pass.

    The sequence is cut into blocks of ``block_size`` queries (capped at the length). Causal: query block i
    attends only to keys 0..(i + 1) * block - 1, so the masked upper triangle is skipped (about (n + 1) / 2n of
    the dense work for n blocks) and no [length, length] matrix is ever built. The loops over blocks are unrolled
    at trace time (fixed-shape matmuls, which XLA:CPU schedules well) and run heads-major ([b, h, t, d]: one
    transpose in, one out) with keys-first score blocks (see `_blockwise_bwd`). Bidirectional: every query block
    attends to all keys (no skipping, the same fast layout).

    Args:
      q, k, v: [batch, length, heads, head_dim], the same length (self-attention).
      causal: mask the keys after each query.
      block_size: query block length; it must divide the length (a block longer than the sequence is capped).
      save_weights: keep each block's unnormalised softmax weights from the forward pass for the backward pass
        (fastest on CPU: ~20% less attention time; memory about half of dense attention's saved probabilities,
        released per layer under remat). False recomputes them from the per-query log-sum-exp instead, flash
        attention style: O(length) memory between the passes.

    Returns:
      [batch, length, heads, head_dim] in q's dtype.

    Raises:
      ValueError: for unequal query/key lengths, or a block size that is not a positive integer dividing the length.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"blockwise attention needs self-attention: q length {q.shape[1]} != kv length {k.shape[1]}")
    block = _check_block(q.shape[1], block_size)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = _blockwise_bhtd(heads_major(_scale(q)), heads_major(k), heads_major(v), block, causal, save_weights)
    return heads_major(out)


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int) -> jax.Array:
    """Causal `blockwise_attention` (kept for callers of the earlier name)."""
    return blockwise_attention(q, k, v, causal=True, block_size=block_size)


def jax_dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, implementation: str | None
) -> jax.Array:
    """`jax.nn.dot_product_attention` ('xla' or 'cudnn'), which takes the same [b, t, h, d] layout."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def _blocks_fit(length: int, block_size: int) -> bool:
    return isinstance(block_size, int) and block_size > 0 and length % min(block_size, length) == 0


def resolve_implementation(name: str, *, causal: bool, length: int, block_size: int, dtype: jnp.dtype) -> str:
    """Turns ``auto`` into a concrete implementation for the current backend and shapes.

    ``auto``: ``cudnn`` on GPU with a 16-bit compute dtype; on CPU ``blockwise`` (causal or not) when the block
    size divides the length (a block longer than the sequence counts as one block); ``dense`` otherwise.
    ``causal`` is part of the signature for backends whose choice depends on it.
    """
    del causal
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if backend == "cpu" and _blocks_fit(length, block_size):
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
    """Dispatches to the configured attention implementation (see module docstring).

    ``blockwise`` needs self-attention (equal query and key lengths); for queries against a longer key sequence
    (decoding with a cache) it falls back to ``dense``.
    """
    impl = resolve_implementation(implementation, causal=causal, length=q.shape[1], block_size=block_size, dtype=q.dtype)
    if impl == "dense":
        return dense_attention(q, k, v, causal=causal)
    if impl == "blockwise":
        if q.shape[1] != k.shape[1]:
            return dense_attention(q, k, v, causal=causal)
        return blockwise_attention(q, k, v, causal=causal, block_size=block_size)
    return jax_dot_product_attention(q, k, v, causal=causal, implementation=impl)


__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "blockwise_attention",
    "blockwise_causal_attention",
    "dense_attention",
    "jax_dot_product_attention",
    "resolve_implementation",
]
