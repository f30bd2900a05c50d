"""Sampling from the autoregressive iGPT with a key/value cache, and the image grids users look at.

Decoding reads the model's own parameter tree (`igpt_jax.model`) and runs the same computation one position at a
time, keeping every layer's keys and values in a cache:

  * `prefill` runs the inputs ``[sos, wte[x_0 .. x_{t-1}]] + wpe[0 .. t]`` of a prefix of t tokens through every
    layer at once (causal attention over the prefix), stores their keys/values at positions 0..t and returns the
    logits of positions 0..t; position t's logits give the first new token x_t.
  * `decode_step` feeds one token x_{i-1} as the input of position i (``wte[x_{i-1}] + wpe[i]``), attends to the
    cached positions 0..i and returns position i's logits (for x_i).
  * `generate` does one prefill and then a ``lax.fori_loop`` of decode steps inside one jitted function, sampling
    each token with temperature / top-k from a per-position key (``fold_in(rng, position)``), so a given seed gives
    the same images on any mesh. `generate_recompute` is the cache-free reference: the full forward pass over the
    whole sequence for every new token (for tests and the benchmark).

The norms and the MLP are the model's own `RMSNorm` and `Mlp` modules applied to the block's parameters; the
attention uses the same q/k/v/o projections with a masked softmax over the cache. Cached logits equal the full
forward pass's (tests/test_sampling.py checks 1e-5 in float32 at every position).

The cache is `KVCache(key, value)`: per layer, [batch, heads, n_ctx, head_dim] arrays in the compute dtype, sharded
like the activations (batch over the data axes, heads over 'tensor') when called under a mesh and rules context;
never along the positions, also under sequence parallelism (a decode step has one position).

Only the autoregressive objective can be sampled; a BERT model raises a ValueError.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from igpt_jax import attention as attention_lib
from igpt_jax import sharding
from igpt_jax.model import IGPT, Mlp, ModelConfig, RMSNorm

_NEG_INF = -1e30
# Decoding is sequential: the sampler never splits the sequence, so its positions are named 'activation_kv_length'
# (unsharded; under sequence parallelism 'activation_length' would split a one-position decode step).
_LENGTH = "activation_kv_length"
_CACHE_AXES = ("activation_batch", "activation_heads", _LENGTH, "activation_kv")


class KVCache(NamedTuple):
    """Keys and values of every position: one [batch, heads, n_ctx, head_dim] array per layer, in tuples.

    One array per layer (not a stacked [n_layer, ...] one) so that a decode step updates and reads each layer's
    cache in place; heads before positions so that the attention's batched matmuls need no transpose of it.
    """

    key: tuple[jax.Array, ...]
    value: tuple[jax.Array, ...]


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
def init_cache(cfg: ModelConfig, batch: int) -> KVCache:
    """An all-zero cache for `batch` sequences of up to n_ctx positions."""
    shape = (batch, cfg.n_head, cfg.n_ctx, cfg.head_dim)
    zeros = lambda: _constrain_cache(jnp.zeros(shape, jnp.dtype(cfg.dtype)))  # noqa: E731
    return KVCache(tuple(zeros() for _ in range(cfg.n_layer)), tuple(zeros() for _ in range(cfg.n_layer)))


def _constrain_cache(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, _CACHE_AXES)


def _embed(cfg: ModelConfig, params: Any, prev_tokens: jax.Array, start: jax.Array | int) -> jax.Array:
    """Inputs of positions start..start+t-1: SOS at position 0, else wte of the previous token; plus wpe.

    Args:
      prev_tokens: int [batch, t], the token x_{p-1} of each position p (ignored where p == 0).
    """
    dt = jnp.dtype(cfg.dtype)
    length = prev_tokens.shape[1]
    positions = start + jnp.arange(length)  # [t]
    emb = jnp.take(params["wte"], prev_tokens, axis=0).astype(dt)  # [b, t, d]
    x = jnp.where((positions == 0)[None, :, None], params["sos"].astype(dt), emb)
    wpe = jax.lax.dynamic_slice_in_dim(params["wpe"], start, length, axis=0).astype(dt)  # [t, d]
    x = x + wpe[None]
    return nn.with_logical_constraint(x, ("activation_batch", _LENGTH, "activation_embed"))


def _qkv(cfg: ModelConfig, p: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ln_1 and the q/k/v projections of one block: q, k, v [b, t, heads, head_dim]."""
    dt = jnp.dtype(cfg.dtype)
    h = RMSNorm(cfg).apply({"params": p["ln_1"]}, x)
    return tuple(jnp.einsum("btd,dhk->bthk", h, p["attn"][name].astype(dt)) for name in ("q", "k", "v"))


def _finish_block(cfg: ModelConfig, p: Any, x: jax.Array, out: jax.Array) -> jax.Array:
    """The rest of a block after attention: output projection, residual, ln_2, MLP, residual."""
    x = x + jnp.einsum("bthk,hkd->btd", out, p["attn"]["o"].astype(jnp.dtype(cfg.dtype)))
    x = x + Mlp(cfg).apply({"params": p["mlp"]}, RMSNorm(cfg).apply({"params": p["ln_2"]}, x))
    return nn.with_logical_constraint(x, ("activation_batch", _LENGTH, "activation_embed"))


def _logits(cfg: ModelConfig, params: Any, x: jax.Array) -> jax.Array:
    h = RMSNorm(cfg).apply({"params": params["ln_f"]}, x)
    logits = jnp.einsum("btd,vd->btv", h, params["wtet"].astype(jnp.dtype(cfg.dtype)),
                        preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("activation_batch", _LENGTH, "activation_vocab"))


def _layer(params: Any, i: int) -> Any:
    """Block i's parameters (from the stacked [n_layer, ...] tree, or a pre-split tuple of per-layer trees)."""
    blocks = params["blocks"]
    return blocks[i] if isinstance(blocks, (tuple, list)) else jax.tree.map(lambda a: a[i], blocks)


def split_layers(params: Any) -> Any:
    """The parameters with ``blocks`` as a tuple of per-layer trees (done once, before a decode loop)."""
    params = dict(nn.meta.unbox(params))
    if not isinstance(params["blocks"], (tuple, list)):
        n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
        params["blocks"] = tuple(_layer(params, i) for i in range(n_layer))
    return params


def prefill(cfg: ModelConfig, params: Any, prefix: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs SOS and a prefix of t tokens (positions 0..t) through the model in one pass, filling the cache.

    The blocks run under `lax.scan` like the model's own; the prefix attends to itself with the model's causal
    attention, and every layer's keys/values of positions 0..t are written into the cache.

    Args:
      cfg: the model (objective 'ar').
      params: its parameters (boxed or plain).
      prefix: int [batch, t] given tokens x_0..x_{t-1}, 0 <= t < n_ctx (t = 0: SOS only).
      cache: from `init_cache`.

    Returns:
      (float32 logits [batch, t + 1, vocab] of positions 0..t, the cache holding positions 0..t).
    """
    t = prefix.shape[1]
    if t >= cfg.n_ctx:
        raise ValueError(f"prefill of a prefix of {t} tokens needs {t + 1} positions, more than n_ctx={cfg.n_ctx}")
    params = nn.meta.unbox(params)
    prev = jnp.pad(prefix.astype(jnp.int32), ((0, 0), (1, 0)))  # the input of position p is x_{p-1}; p = 0: SOS
    x = _embed(cfg, params, prev, 0)
    # blockwise and splash need whole blocks of the prefix's length; 'auto' checks and falls back.
    impl = "auto" if cfg.attention in ("blockwise", "splash") else cfg.attention

    def block(x, p):
        q, k, v = _qkv(cfg, p, x)
        out = attention_lib.attention(q, k, v, causal=True, implementation=impl, block_size=cfg.attention_block,
                                      splash_blocks=(cfg.splash_block_q, cfg.splash_block_kv))
        return _finish_block(cfg, p, x, out), (k, v)

    blocks = params["blocks"]
    if isinstance(blocks, (tuple, list)):
        blocks = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    x, (keys, values) = jax.lax.scan(block, x, blocks, unroll=cfg.scan_unroll)  # [L, b, t + 1, h, k]

    def write(cached: jax.Array, new: jax.Array) -> jax.Array:  # [b, h, n, k] <- [b, t + 1, h, k] at 0
        new = jnp.swapaxes(new, 1, 2).astype(cached.dtype)
        return _constrain_cache(jax.lax.dynamic_update_slice_in_dim(cached, new, 0, axis=2))

    cache = KVCache(tuple(write(c, keys[i]) for i, c in enumerate(cache.key)),
                    tuple(write(c, values[i]) for i, c in enumerate(cache.value)))
    return _logits(cfg, params, x), cache


def decode_step(cfg: ModelConfig, params: Any, cache: KVCache, prev_token: jax.Array,
                position: jax.Array | int) -> tuple[jax.Array, KVCache]:
    """One cached step: the input of `position` (>= 1) is the previous token x_{position-1}.

    The layers are unrolled, each reading and updating its own cache array in place; inside a loop, pass
    `split_layers(params)` so that the per-layer parameters are sliced once, outside it.

    Args:
      cfg: the model.
      params: its parameters.
      cache: holding positions 0..position-1.
      prev_token: int [batch], the token x_{position-1}.
      position: the position to compute (a traced scalar is fine).

    Returns:
      (float32 logits [batch, vocab] of `position`, i.e. the distribution of x_position; the updated cache).
    """
    params = nn.meta.unbox(params)
    x = _embed(cfg, params, prev_token[:, None].astype(jnp.int32), position)  # [b, 1, d]
    scale = 1.0 / math.sqrt(cfg.head_dim)
    allowed = jnp.arange(cfg.n_ctx) <= position  # [n]: the cached positions and this one
    keys, values = list(cache.key), list(cache.value)
    for i in range(cfg.n_layer):
        p = _layer(params, i)
        q, k, v = _qkv(cfg, p, x)  # [b, 1, h, k]
        keys[i] = _constrain_cache(jax.lax.dynamic_update_slice_in_dim(
            keys[i], jnp.swapaxes(k, 1, 2).astype(keys[i].dtype), position, axis=2))
        values[i] = _constrain_cache(jax.lax.dynamic_update_slice_in_dim(
            values[i], jnp.swapaxes(v, 1, 2).astype(values[i].dtype), position, axis=2))
        q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [b, h, 1, k]
        scores = jnp.einsum("bhqd,bhnd->bhqn", q, keys[i], preferred_element_type=jnp.float32)  # [b, h, 1, n]
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG_INF), axis=-1).astype(values[i].dtype)
        out = jnp.einsum("bhqn,bhnd->bqhd", probs, values[i])  # [b, 1, h, k]
        x = _finish_block(cfg, p, x, out)
    return _logits(cfg, params, x)[:, 0], KVCache(tuple(keys), tuple(values))


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
    params = split_layers(params)
    cache = init_cache(cfg, batch)
    logits, cache = prefill(cfg, params, prefix, cache)
    tokens = jnp.zeros((batch, length), jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, prefix, 0, axis=1)
    tokens = tokens.at[:, t].set(sample(jax.random.fold_in(rng, t), logits[:, -1]))

    def body(position, carry):
        tokens, cache = carry
        prev = jax.lax.dynamic_index_in_dim(tokens, position - 1, axis=1, keepdims=False)
        logits, cache = decode_step(cfg, params, cache, prev, position)
        new = sample(jax.random.fold_in(rng, position), logits)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, position, axis=1)
        return nn.with_logical_constraint(tokens, ("activation_batch", _LENGTH)), cache

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


# ------------------------------------------------------------------------------------------------ grids
def image_grid(images: np.ndarray, *, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Tiles uint8 images [rows, cols, H, W, C] into one uint8 image with `pad` pixels around every cell.

    Each image is first enlarged `scale` times (nearest neighbour). The result is
    [rows * (H*scale + pad) + pad, cols * (W*scale + pad) + pad, C].
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [rows, cols, H, W, C], got {images.dtype} {images.shape}")
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    rows, cols, h, w, c = images.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.uint8)
    for r in range(rows):
        for col in range(cols):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = images[r, col]
    return grid


def default_scale(resolution: int) -> int:
    """Enlarges small images (8x8 digits) so that a cell is at least 32 pixels wide."""
    return max(1, 32 // max(1, resolution))


def completion_panels(palette, originals: np.ndarray, samples: np.ndarray, *, resolution: int, given_rows: int,
                      hidden_value: int = 128) -> np.ndarray:
    """Rows of [original, the given rows (the rest grey), sample 1, ..., sample S] as uint8 images.

    Args:
      palette: a `igpt_jax.palette.Palette` (its `decode` maps ids to uint8 colours).
      originals: int [num_images, resolution**2] tokens of the original images.
      samples: int [num_images, samples_per_image, resolution**2] completions.
      resolution: image side.
      given_rows: rows given to the model.
      hidden_value: grey level shown where the model was given nothing.

    Returns:
      uint8 [num_images, 2 + samples_per_image, resolution, resolution, C].
    """
    n, s = samples.shape[:2]
    shape = (resolution, resolution)
    orig = palette.decode(np.asarray(originals).reshape(n, 1, *shape))  # [n, 1, H, W, C]
    given = orig.copy()
    given[:, :, given_rows:] = hidden_value
    samp = palette.decode(np.asarray(samples).reshape(n, s, *shape))
    return np.concatenate([orig, given, samp], axis=1)


def sample_panels(palette, samples: np.ndarray, *, resolution: int, columns: int | None = None) -> np.ndarray:
    """Unconditional samples [N, resolution**2] laid out in rows of `columns` (default ~sqrt(N)) images."""
    samples = np.asarray(samples)
    n = samples.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    images = palette.decode(samples.reshape(n, resolution, resolution))  # [N, H, W, C]
    blank = np.full((rows * columns - n,) + images.shape[1:], 255, np.uint8)
    return np.concatenate([images, blank]).reshape(rows, columns, *images.shape[1:])


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes uint8 [H, W, 1 or 3] as PNG."""
    from PIL import Image  # noqa: PLC0415

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"png_bytes expects uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | epath.PathLike, image: np.ndarray) -> epath.Path:
    """Writes uint8 [H, W, C] as a PNG file (local or gs://)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def save_npy(path: str | epath.PathLike, array: np.ndarray) -> epath.Path:
    """Writes an array as .npy (local or gs://)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    path.write_bytes(buf.getvalue())
    return path
