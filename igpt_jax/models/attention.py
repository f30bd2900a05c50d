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
  * ``splash``: the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`; causal
    mask for the autoregressive objective, full mask for BERT), called under `jax.shard_map` over the batch, head
    and query-sequence shards that the logical rules place ('activation_batch', 'activation_heads',
    'activation_length'); keys and values enter whole ('activation_kv_length': gathered), as the kernel cannot
    split them. Off TPU (tests on CPU) it runs in Pallas interpret mode: the same kernel, interpreted, slowly.
  * ``auto``: ``splash`` on TPU when its block sizes divide the per-shard length (else ``dense``, logged);
    ``cudnn`` on GPU with a 16-bit compute dtype; ``blockwise`` on CPU when the length divides into blocks;
    ``dense`` otherwise.

Prefix-causal attention (``prefix_len``, [batch] int: AIM's prefix mask, `ModelConfig.mask` 'prefix'): query i of
example b attends to key j when j <= i or j < prefix_len[b], so the first prefix_len[b] positions see each other
bidirectionally and the rest causally; prefix_len 0 is the causal mask exactly. ``dense`` and ``blockwise`` take it
(blockwise then computes every key block, as the prefix reaches keys after the query block: the causal skipping is
lost); ``xla``, ``cudnn`` and ``splash`` fall back to ``dense`` (logged): the splash kernel's masks are static per
head, not per example, and cuDNN's masks are causal or padding masks.

The platform is that of the mesh in context (`jax.set_mesh`), so a step lowered for a described TPU slice on this
CPU (the compile job) chooses as a TPU would; without a mesh it is `jax.default_backend()`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "xla", "cudnn", "splash")

SPLASH_LANES = 128  # the splash kernel's key/value blocks are multiples of the TPU's 128 lanes

_NEG_INF = -1e30  # finite, so fully masked rows (never produced here) cannot turn into NaN


def _scale(q: jax.Array) -> jax.Array:
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    q_start: jax.Array | int | None = None, prefix_len: jax.Array | None = None) -> jax.Array:
    """Masked-softmax attention over the whole sequence.

    Args:
      q: queries [batch, q_len, heads, head_dim].
      k: keys [batch, kv_len, heads, head_dim].
      v: values [batch, kv_len, heads, head_dim].
      causal: if True, query i attends to keys j <= q_start + i.
      q_start: the key position of the first query (a traced scalar is fine); None: kv_len - q_len (the queries
        are the last q_len positions). Decoding with a cache passes the cache index: the cache's later, not yet
        written positions are then masked.
      prefix_len: int [batch] (causal only): keys j < prefix_len[b] are visible to every query of example b (the
        prefix-causal mask); None: the causal mask.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", _scale(q), k, preferred_element_type=jnp.float32)
    if causal:
        q_len, kv_len = q.shape[1], k.shape[1]
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len if q_start is None else q_start)
        k_pos = jnp.arange(kv_len)
        allowed = q_pos >= k_pos[None, :]  # [q, k]
        if prefix_len is not None:
            allowed = allowed[None, None] | (k_pos < prefix_len[:, None, None, None])  # [b, 1, q, k]
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


def _scores_t(q_blk: jax.Array, k: jax.Array, lo: int, block: int, causal: bool,
              prefix: jax.Array | None = None) -> jax.Array:
    """Masked scores of one query block, keys first: [b, h, keys, B] float32 (keys: all, or 0..lo+block-1).

    With ``prefix`` ([b] int, causal): every key, visible where key <= query or key < prefix[b].
    """
    keys = lo + block if causal and prefix is None else k.shape[2]  # causal: later keys are masked for every query
    scores_t = jnp.einsum("bhkd,bhqd->bhkq", k[:, :, :keys], q_blk, preferred_element_type=jnp.float32)
    if causal and prefix is not None:
        k_pos = jnp.arange(keys)[:, None]
        visible = (k_pos <= lo + jnp.arange(block)[None, :])[None, None] | (k_pos < prefix[:, None, None, None])
        scores_t = jnp.where(visible, scores_t, _NEG_INF)
    elif causal:
        scores_t = jnp.where(_visible_t(block, lo), scores_t, _NEG_INF)
    return scores_t


def _blockwise_forward(q, k, v, prefix, block: int, causal: bool):
    """Output [b, h, t, d] and, per query block, exp(scores - row max) [b, h, keys, B], max and sum [b, h, 1, B]."""
    v_t = jnp.swapaxes(v, 2, 3)  # [b, h, d, t]
    outputs, weights, maxes, sums = [], [], [], []
    for lo in range(0, q.shape[2], block):
        scores_t = _scores_t(q[:, :, lo : lo + block], k, lo, block, causal, prefix)
        row_max = jnp.max(scores_t, axis=2, keepdims=True)
        unnormalised = jnp.exp(scores_t - row_max).astype(v.dtype)
        total = jnp.sum(unnormalised, axis=2, keepdims=True, dtype=jnp.float32)
        keys = unnormalised.shape[2]
        out_t = jnp.einsum("bhdk,bhkq->bhdq", v_t[..., :keys], unnormalised, preferred_element_type=jnp.float32)
        outputs.append((out_t / total).astype(q.dtype))  # normalise the [d, B] output, not the [keys, B] weights
        weights.append(unnormalised), maxes.append(row_max), sums.append(total)
    out = jnp.swapaxes(jnp.concatenate(outputs, axis=3), 2, 3)
    return out, weights, maxes, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise_bhtd(q, k, v, prefix, block: int, causal: bool, save_weights: bool):
    """Softmax attention over [batch, heads, length, head_dim] (q already scaled), one query block at a time;
    ``prefix``: None or the prefix-causal mask's [batch] prefix lengths."""
    del save_weights
    return _blockwise_forward(q, k, v, prefix, block, causal)[0]


def _blockwise_fwd(q, k, v, prefix, block, causal, save_weights):
    out, weights, maxes, sums = _blockwise_forward(q, k, v, prefix, block, causal)
    if save_weights:
        return out, (q, k, v, prefix, out, weights, sums)
    lse = jnp.concatenate([m + jnp.log(s) for m, s in zip(maxes, sums)], axis=3)  # [b, h, 1, t]
    return out, (q, k, v, prefix, out, lse)


def _blockwise_bwd(block, causal, save_weights, residuals, d_out):
    """Backward pass, block by block, in the same keys-first score layout as the forward pass.

    Keys first ([keys, queries] blocks) because then every matmul of the backward pass (dk = ds^T q, dv = p^T do,
    dq^T = k^T ds^T) and of the forward pass (out^T = v^T p) is a plain row-major product, which XLA:CPU hands to
    its fast matmul library; with queries first, autodiff's transposed products became loops costing 3-8x as much
    (bench/RESULTS.md). The weights come from the forward pass (``save_weights``) or are recomputed from the saved
    log-sum-exp (flash-attention style: no O(length^2) residuals).
    """
    if save_weights:
        q, k, v, prefix, out, weights, sums = residuals
    else:
        q, k, v, prefix, out, lse = residuals
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
            scores_t = _scores_t(q_blk, k, lo, block, causal, prefix)
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
    return dq.astype(q.dtype), total(dk_parts).astype(k.dtype), total(dv_parts).astype(v.dtype), None


_blockwise_bhtd.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, block_size: int, save_weights: bool = True,
    prefix_len: jax.Array | None = None,
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
      prefix_len: int [batch] (causal only): the prefix-causal mask (see the module docstring); every query block
        then computes all key blocks.

    Returns:
      [batch, length, heads, head_dim] in q's dtype.

    Raises:
      ValueError: for unequal query/key lengths, or a block size that is not a positive integer dividing the length.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"blockwise attention needs self-attention: q length {q.shape[1]} != kv length {k.shape[1]}")
    block = _check_block(q.shape[1], block_size)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    prefix = None if prefix_len is None else jnp.asarray(prefix_len, jnp.int32)
    out = _blockwise_bhtd(heads_major(_scale(q)), heads_major(k), heads_major(v), prefix, block, causal,
                          save_weights)
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


# ---------------------------------------------------------------------------------------------- splash (TPU)
def current_platform() -> str:
    """The platform of the mesh in context ('tpu' for a described TPU slice's devices), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _mesh_axes(logical_name: str, mesh: Any) -> tuple[str, ...]:
    """The mesh axes of the context's rules for a logical name (only axes of `mesh`)."""
    if mesh.empty or not nn.get_logical_axis_rules():
        return ()
    axes = nn.logical_to_mesh_axes((logical_name,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.axis_names)


def _size(mesh: Any, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def sequence_shards() -> int:
    """How many ways the context's mesh and rules split the query sequence ('activation_length'); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return _size(mesh, _mesh_axes("activation_length", mesh)) if not mesh.empty else 1


def splash_blocks_fit(length: int, q_shards: int, block_q: int, block_kv: int) -> str | None:
    """None when splash's blocks fit ``length`` split ``q_shards`` ways, else why not (for the fallback's log)."""
    if length % q_shards:
        return f"sequence length {length} does not split into {q_shards} sequence shards"
    per_shard = length // q_shards
    if per_shard % min(block_q, per_shard):
        return f"block_q {block_q} does not divide the per-shard length {per_shard}"
    if length % min(block_kv, length):
        return f"block_kv {block_kv} does not divide the key length {length}"
    if min(block_kv, length) % SPLASH_LANES:
        return f"the key block {min(block_kv, length)} is not a multiple of the kernel's {SPLASH_LANES} lanes"
    return None


def _make_splash_kernel(length: int, heads: int, *, causal: bool, block_q: int, block_kv: int, head_shards: int,
                        q_shards: int, interpret: bool):
    """The splash kernel for [heads, length, head_dim] inputs (one example) with blocks capped at the shard size.

    Causal: the [length, length] mask's rows split into ``q_shards`` (each shard's mask info, `manual_sharding_spec`).
    Full (BERT): every query shard sees the same all-true rows, so the kernel is built for one shard's queries
    against all keys, [length / q_shards, length], and is not split along the sequence (this jax's mask processing
    fails for a full mask split along the queries).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,  # noqa: PLC0415
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,  # noqa: PLC0415
    )

    q_len = length // q_shards
    bq, bkv = min(block_q, q_len), min(block_kv, length)
    blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                   block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    if causal:
        one = mask_lib.CausalMask((length, length))
    else:
        one, q_shards = mask_lib.FullMask((q_len, length)), 1
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * heads), block_sizes=blocks,
                                      head_shards=head_shards, q_seq_shards=q_shards, interpret=interpret)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, block_q: int = 512, block_kv: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """The Pallas splash-attention kernel, under `shard_map` over the mesh in context.

    With a mesh and rules in context (`jax.set_mesh`, `nn.logical_axis_rules`), the batch, heads and query sequence
    are split as 'activation_batch', 'activation_heads' and 'activation_length' place them; every device gets the
    whole key/value sequence of its examples and heads (all-gathered) and the kernel's mask rows of its query shard
    (`make_splash_mha(q_seq_shards=...)` and `manual_sharding_spec`). Without a mesh it runs on the whole arrays.

    Args:
      q, k, v: [batch, length, heads, head_dim], the same length (self-attention).
      causal: causal mask (autoregressive) or full mask (BERT).
      block_q, block_kv: the kernel's query and key/value block lengths (forward and backward), capped at the
        per-shard query length and the key length; they must divide them.
      interpret: run the kernel in Pallas interpret mode; None: when the platform is not a TPU.

    Returns:
      [batch, length, heads, head_dim] in q's dtype.

    Raises:
      ValueError: for unequal query/key lengths, blocks that do not divide the (per-shard) length, or heads or
        batch that do not split over their mesh axes.
    """
    batch, length, heads, _ = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention needs self-attention: q length {length} != kv length {k.shape[1]}")
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axes, length_axes = (_mesh_axes(n, mesh) for n in
                                          ("activation_batch", "activation_heads", "activation_length"))
    head_shards, q_shards = _size(mesh, head_axes) if head_axes else 1, _size(mesh, length_axes) if length_axes else 1
    why = splash_blocks_fit(length, q_shards, block_q, block_kv)
    if why:
        raise ValueError(f"splash attention: {why}; choose model.splash_block_q/kv that divide it (or another "
                         "model.attention)")
    if heads % head_shards or (batch_axes and batch % _size(mesh, batch_axes)):
        raise ValueError(f"splash attention: {heads} heads or batch {batch} do not split over the mesh axes "
                         f"{head_axes} ({head_shards}) / {batch_axes}")
    if interpret is None:
        interpret = current_platform() != "tpu"
    kernel = _make_splash_kernel(length, heads, causal=causal, block_q=block_q, block_kv=block_kv,
                                 head_shards=head_shards, q_shards=q_shards, interpret=interpret)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, t, h, d] <-> [b, h, t, d]
    q, k, v = heads_major(_scale(q)), heads_major(k), heads_major(v)

    def run(kernel, q, k, v):
        return jax.vmap(kernel)(q, k, v)

    if not (batch_axes or head_axes or length_axes):  # no mesh (or nothing split): the whole arrays
        return heads_major(run(kernel, q, k, v))
    b, h, t = _spec_entry(batch_axes), _spec_entry(head_axes), _spec_entry(length_axes)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(h, t if causal else None)))
    q_spec, kv_spec = P(b, h, t, None), P(b, h, None, None)
    out = jax.shard_map(run, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec), out_specs=q_spec,
                        check_vma=False)(kernel, q, k, v)
    return heads_major(out)


# ---------------------------------------------------------------------------------------------- dispatch
def resolve_implementation(
    name: str, *, causal: bool, length: int, block_size: int, dtype: jnp.dtype, platform: str | None = None,
    q_shards: int = 1, splash_blocks: tuple[int, int] = (512, 512),
) -> str:
    """Turns ``auto`` into a concrete implementation for the platform and shapes.

    ``auto``: on TPU ``splash`` when its blocks (``splash_blocks`` = (block_q, block_kv)) divide the length split
    ``q_shards`` ways, else ``dense`` (logged with the reason); ``cudnn`` on GPU with a 16-bit compute dtype; on
    CPU ``blockwise`` (causal or not) when the block size divides the length (a block longer than the sequence
    counts as one block); ``dense`` otherwise. ``platform`` defaults to `current_platform()`.
    """
    del causal
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    platform = platform or current_platform()
    if platform == "tpu":
        why = splash_blocks_fit(length, q_shards, *splash_blocks)
        if why is None:
            return "splash"
        logging.info("attention 'auto' on TPU: dense, not splash, because %s", why)
        return "dense"
    if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if platform == "cpu" and _blocks_fit(length, block_size):
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
    splash_blocks: tuple[int, int] = (512, 512),
    q_start: jax.Array | int | None = None,
    prefix_len: jax.Array | None = None,
) -> jax.Array:
    """Dispatches to the configured attention implementation (see module docstring).

    ``blockwise`` and ``splash`` need self-attention (equal query and key lengths); for queries against a longer
    key sequence, or queries placed at ``q_start`` in a key/value cache (decoding, see `dense_attention`), every
    implementation falls back to ``dense``. With ``prefix_len`` (the prefix-causal mask, causal only) ``xla``,
    ``cudnn`` and ``splash`` fall back to ``dense`` (logged once per trace).
    """
    if prefix_len is not None and not causal:
        raise ValueError("prefix_len (the prefix-causal mask) needs causal attention")
    impl = resolve_implementation(implementation, causal=causal, length=q.shape[1], block_size=block_size,
                                  dtype=q.dtype, q_shards=sequence_shards(), splash_blocks=splash_blocks)
    if q_start is not None or (impl in ("blockwise", "splash") and q.shape[1] != k.shape[1]):
        impl = "dense"
    if prefix_len is not None and impl not in ("dense", "blockwise"):
        logging.info("attention %r has no per-example prefix mask: dense attention for the prefix-causal mask", impl)
        impl = "dense"
    if impl == "dense":
        return dense_attention(q, k, v, causal=causal, q_start=q_start, prefix_len=prefix_len)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, causal=causal, block_size=block_size, prefix_len=prefix_len)
    if impl == "splash":
        return splash_attention(q, k, v, causal=causal, block_q=splash_blocks[0], block_kv=splash_blocks[1])
    return jax_dot_product_attention(q, k, v, causal=causal, implementation=impl)


__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "blockwise_attention",
    "blockwise_causal_attention",
    "dense_attention",
    "jax_dot_product_attention",
    "resolve_implementation",
    "splash_attention",
]
