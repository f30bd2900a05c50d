"""The iGPT decoder, exactly as OpenAI released it (see ../shared/REFERENCE.md), as Flax Linen modules.

What makes it iGPT and not plain GPT-2:
  * RMS-style norm (no mean subtraction, no bias, eps 1e-5) before attention, before the MLP and after the last block.
  * No bias in any linear layer; quick-GELU MLP (x * sigmoid(1.702 x)) of width 4d; separate q/k/v/o projections.
  * Learned start-of-sequence vector: the autoregressive input is [sos, wte[x_0..x_{n-2}]] + wpe, so position i
    predicts token i and every token is scored.
  * Output projection ``wtet`` untied from ``wte`` and zero-initialised.
  * Sparse-Transformer initialisation: q, k, v ~ N(0, 1/sqrt(d)); attention output ~ N(0, 1/sqrt(d * n_layer));
    MLP ~ N(0, 0.02); wte, sos ~ N(0, 0.02); wpe ~ N(0, 0.01).

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp', 'layers', 'position'); the
rules table in `igpt_jax.sharding` maps them to mesh axes. The blocks are stacked with `nn.scan` (one compiled
block, a leading 'layers' axis on every block parameter) under a configurable `jax.checkpoint` policy.

Sampling runs these same modules with ``decode=True`` (`IGPT`): a key/value cache per layer in the Flax "cache"
collection (`init_cache`, `KVCache`), the layers unrolled over views of the same parameters (`UnrolledBlocks`).

Parameter tree (shapes for L layers, width d, H heads of size k, vocabulary V, context n):
  wte [V, d]  wpe [n, d]  sos [d]  wtet [V, d]  ln_f/scale [d]
  blocks/ln_1/scale [L, d]  blocks/attn/{q,k,v} [L, d, H, k]  blocks/attn/o [L, H, k, d]
  blocks/ln_2/scale [L, d]  blocks/mlp/fc [L, d, 4d]  blocks/mlp/proj [L, 4d, d]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from igpt_jax.models import attention as attention_lib

OBJECTIVES = ("ar", "bert")
MASKS = ("causal", "prefix")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder. Built from ``config.model`` with `ModelConfig.from_config`.

    Attributes:
      vocab_size: number of palette colours (token ids are 0..vocab_size-1).
      n_ctx: context length = resolution**2; the number of learned positions.
      d_model: width d.
      n_head: attention heads; must divide d_model.
      n_layer: number of blocks L.
      mlp_ratio: MLP width as a multiple of d (4 in iGPT).
      objective: 'ar' (autoregressive, causal) or 'bert' (masked, bidirectional).
      bert_mask_rate: probability that a position is masked under the BERT objective.
      mask: the autoregressive objective's attention mask while pretraining: 'causal' (iGPT) or 'prefix' (AIM's
        prefix-causal mask: each example draws a prefix length, its prefix attends bidirectionally, the rest
        causally, and the loss is taken on the positions after the prefix only). A prefix model's features for
        probes are extracted bidirectionally (the whole image as its prefix); sampling decodes causally.
      prefix_min: 'prefix' mask: the smallest prefix length drawn (uniformly, per example, in tokens).
      prefix_max: 'prefix' mask: the largest prefix length drawn; 0: n_ctx - 1 (at least one scored position).
      attention: 'auto', 'dense', 'blockwise', 'xla', 'cudnn' or 'splash' (see `igpt_jax.models.attention`).
      attention_block: block length of the blockwise causal attention.
      splash_block_q: query block length of the splash kernel (TPU; capped at the per-shard sequence length).
      splash_block_kv: key/value block length of the splash kernel (capped at the sequence length).
      remat: rematerialisation policy of a block: 'none', 'full' (save nothing), 'dots' (save matmul outputs),
        'dots_no_batch' (save weight matmuls only), 'minimal' (save only the block's attention and MLP outputs).
      dtype: compute dtype ('float32' or 'bfloat16'); parameters, norms, softmax and logits stay float32.
      param_dtype: parameter dtype.
      norm_eps: epsilon of the RMS norm.
      dropout: residual and embedding dropout rate (the paper uses none).
      scan_unroll: `nn.scan` unroll factor over the layers; 0 (the default): the whole stack unrolled on CPU, 1
        elsewhere (`scan_unroll_for`). XLA:CPU zero-fills a scan's stacked per-layer residuals at every step,
        which made a step 12-19 % slower than unrolled (bench/RESULTS.md); on TPU and GPU a rolled scan compiles
        one layer for any depth.
    """

    vocab_size: int = 512
    n_ctx: int = 1024
    d_model: int = 512
    n_head: int = 8
    n_layer: int = 24
    mlp_ratio: int = 4
    objective: str = "ar"
    bert_mask_rate: float = 0.15
    mask: str = "causal"
    prefix_min: int = 0
    prefix_max: int = 0
    attention: str = "auto"
    attention_block: int = 128
    splash_block_q: int = 512
    splash_block_kv: int = 512
    remat: str = "full"
    dtype: str = "float32"
    param_dtype: str = "float32"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    scan_unroll: int = 0

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "n_ctx", "d_model", "n_head", "n_layer", "mlp_ratio", "attention_block",
                     "splash_block_q", "splash_block_kv"):
            positive(name)
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 0:
            raise ValueError(f"model.scan_unroll must be an integer >= 0 (0: unrolled on CPU, 1 elsewhere), got "
                             f"{self.scan_unroll!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                f"the width must be a multiple of the number of heads"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective={self.objective!r}, expected one of {OBJECTIVES}")
        self._check_mask()
        if not 0.0 < self.bert_mask_rate < 1.0:
            raise ValueError(f"model.bert_mask_rate={self.bert_mask_rate} must lie strictly between 0 and 1")
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r}, expected one of {attention_lib.IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}, expected one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name}={getattr(self, name)!r}, expected 'float32', 'bfloat16' or 'float16'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must lie in [0, 1)")

    def _check_mask(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"model.mask={self.mask!r}, expected one of {MASKS}")
        if self.mask == "prefix" and self.objective != "ar":
            raise ValueError(f"model.mask='prefix' needs model.objective='ar', got {self.objective!r}")
        top = self.prefix_max or self.n_ctx - 1
        if not (isinstance(self.prefix_min, int) and isinstance(self.prefix_max, int)
                and 0 <= self.prefix_min <= top <= self.n_ctx - 1):
            raise ValueError(f"model.prefix_min={self.prefix_min!r} and model.prefix_max={self.prefix_max!r} must "
                             f"satisfy 0 <= prefix_min <= prefix_max <= n_ctx - 1 = {self.n_ctx - 1} (prefix_max 0: "
                             "n_ctx - 1)")

    @property
    def prefix_range(self) -> tuple[int, int]:
        """(smallest, largest) prefix length drawn while pretraining with the 'prefix' mask."""
        return self.prefix_min, self.prefix_max or self.n_ctx - 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def causal(self) -> bool:
        return self.objective == "ar"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> "ModelConfig":
        """Builds a ModelConfig from a mapping or ml_collections ConfigDict; unknown keys are an error."""
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**items)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class ModelOutput(NamedTuple):
    """What one forward pass returns.

    Attributes:
      logits: [batch, length, vocab] float32, or None when not requested.
      layer_features: [batch, n_layer + 1, d * feature_grid^2] float32 or None. Entry l < L is the sequence mean
        of block l's normalised attention input (``ln_1`` output), the paper's linear-probe feature; entry L is the
        sequence mean of the final norm's output (each pooled by region instead with ``feature_grid`` > 1).
      final_features: [batch, d] float32 or None: the sequence mean of ``ln_f``'s output (for fine-tuning).
    """

    logits: jax.Array | None
    layer_features: jax.Array | None
    final_features: jax.Array | None


def quick_gelu(x: jax.Array) -> jax.Array:
    """The released model's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    }[name]


def _rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [b, t, n] @ w [n, m] -> [b, t, m], as one 2-D matmul over the [b * t] rows when the sequence is whole.

    Flattened rows (bitcast reshapes) because with batch and length as separate einsum dimensions XLA:CPU turned
    the weight gradients into slow strided transposes (bench/RESULTS.md). Under sequence parallelism (the rules
    split 'activation_length') a [batch, length] split does not flatten into one split of the rows, and XLA would
    gather the whole sequence on every device: there the einsum keeps both dimensions. Same math either way.
    """
    b, t, n = x.shape
    if attention_lib.sequence_shards() > 1:
        return jnp.einsum("btn,nm->btm", x, w)
    return (x.reshape(b * t, n) @ w).reshape(b, t, w.shape[1])


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x**2) + eps) * g, computed in float32, no bias, g initialised to 1."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), jnp.dtype(cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        return (y * scale.astype(jnp.float32)).astype(cfg.dtype)


# The decode cache's layout [batch, heads, n_ctx, head_dim]: never split along the positions.
CACHE_AXES = ("activation_batch", "activation_heads", "activation_kv_length", "activation_kv")


class KVCache(nn.Module):
    """One layer's decode cache: the keys and values of every position so far, in the "cache" collection.

    Holds ``key`` and ``value``, [batch, heads, n_ctx, head_dim] each (heads before positions, so that the
    attention's batched matmuls read them without a transpose), in the compute dtype, sharded by `CACHE_AXES`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, key: jax.Array, value: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes key/value [b, t, h, k] at positions index..index+t-1; returns all n_ctx positions [b, n, h, k].

        Positions after index+t-1 hold zeros or stale entries: the causal mask at ``q_start=index`` hides them.
        """
        b, _, h, k = key.shape
        shape = (b, h, self.config.n_ctx, k)

        def write(name: str, new: jax.Array) -> jax.Array:
            cached = self.variable("cache", name, jnp.zeros, shape, new.dtype)
            updated = jax.lax.dynamic_update_slice_in_dim(cached.value, jnp.swapaxes(new, 1, 2), index, axis=2)
            cached.value = nn.with_logical_constraint(updated, CACHE_AXES)
            return jnp.swapaxes(cached.value, 1, 2)  # [b, n, h, k]: the attention's layout (a view for XLA)

        return write("key", key), write("value", value)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections and no biases.

    With ``decode`` the keys and values also go to the layer's `KVCache`, and the queries (positions
    ``index``..) attend to every cached position up to their own (dense masked softmax); same parameters.
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, index: jax.Array | None = None,
                 prefix_len: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        qkv_init = nn.initializers.normal(stddev=1.0 / math.sqrt(d))
        out_init = nn.initializers.normal(stddev=1.0 / math.sqrt(d * cfg.n_layer))
        wq = _param(self, "q", qkv_init, (d, h, k), ("embed", "heads", "kv"), pdt)
        wk = _param(self, "k", qkv_init, (d, h, k), ("embed", "heads", "kv"), pdt)
        wv = _param(self, "v", qkv_init, (d, h, k), ("embed", "heads", "kv"), pdt)
        wo = _param(self, "o", out_init, (h, k, d), ("heads", "kv", "embed"), pdt)
        q_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        kv_axes = ("activation_batch", "activation_kv_length", "activation_heads", "activation_kv")  # gathered
        # The projections are 2-D matmuls over the flattened [batch * length] rows (`_rows_matmul`).
        b, t, _ = x.shape

        def project(w: jax.Array, axes: tuple[str, ...]) -> jax.Array:
            heads = _rows_matmul(x, w.astype(dt).reshape(d, h * k)).reshape(b, t, h, k)
            return nn.with_logical_constraint(heads, axes)

        q, key, v = project(wq, q_axes), project(wk, kv_axes), project(wv, kv_axes)
        if self.decode:
            key, v = KVCache(cfg, name="cache")(key, v, index)
        out = attention_lib.attention(
            q, key, v, causal=cfg.causal, implementation=cfg.attention, block_size=cfg.attention_block,
            splash_blocks=(cfg.splash_block_q, cfg.splash_block_kv), q_start=index if self.decode else None,
            prefix_len=prefix_len,
        )
        out = nn.with_logical_constraint(out, q_axes)
        out = _rows_matmul(out.reshape(b, t, h * k), wo.astype(dt).reshape(h * k, d))
        return checkpoint_name(out, "attn_out")


class Mlp(nn.Module):
    """fc -> quick GELU -> proj, width 4d, no biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(stddev=0.02)
        w_fc = _param(self, "fc", init, (cfg.d_model, cfg.d_mlp), ("embed", "mlp"), pdt)
        w_proj = _param(self, "proj", init, (cfg.d_mlp, cfg.d_model), ("mlp", "embed"), pdt)
        # 2-D matmuls over [batch * length] rows, as in `Attention` (3x faster backward on XLA:CPU).
        hidden = quick_gelu(_rows_matmul(x, w_fc.astype(dt)))
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        out = _rows_matmul(hidden, w_proj.astype(dt))
        return checkpoint_name(out, "mlp_out")


def pool_grid(h: jax.Array, grid: int) -> jax.Array:
    """Mean of a sequence over ``grid`` x ``grid`` regions of its square token grid (raster order), concatenated.

    Args:
      h: [batch, length, d]; with grid > 1, length must be a square whose side ``grid`` divides.
      grid: 1 for the mean over all positions (the paper's probe feature), 2 for the four quadrants, ...; 0 for
        no pooling (every position: the attentive probe's token features).

    Returns:
      [batch, grid * grid * d] float32: region (row i, column j) of the grid at [(i * grid + j) * d, ... + d);
      with grid 0, h itself [batch, length, d] in float32.
    """
    h = h.astype(jnp.float32)
    if grid == 0:
        return h
    if grid == 1:
        return jnp.mean(h, axis=1)
    batch, length, d = h.shape
    side = math.isqrt(length)
    if side * side != length or side % grid:
        raise ValueError(f"feature pooling over a {grid}x{grid} grid needs a square token grid whose side {grid} "
                         f"divides; got {length} tokens")
    r = side // grid
    return jnp.mean(h.reshape(batch, grid, r, grid, r, d), axis=(2, 4)).reshape(batch, grid * grid * d)


class Block(nn.Module):
    """One pre-norm transformer block; as a scan body it maps x -> (x', ln_1(x) pooled by `pool_grid`).

    ``index`` (decoding only) is the position of x's first row in the decode cache; ``prefix_len`` ([batch] int
    or None) the prefix-causal mask's prefix lengths (`igpt_jax.models.attention`).
    """

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False
    feature_grid: int = 1  # `pool_grid` of the probe feature: 1 the sequence mean, 2 the four quadrants' means

    @nn.compact
    def __call__(self, x: jax.Array, index: jax.Array | None = None,
                 prefix_len: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        h = RMSNorm(cfg, name="ln_1")(x)
        feature = pool_grid(h, self.feature_grid)  # [b, grid^2 * d]: the probe feature of this layer
        a = Attention(cfg, self.decode, name="attn")(h, index, prefix_len)
        x = x + nn.Dropout(cfg.dropout)(a, deterministic=self.deterministic)
        m = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="ln_2")(x))
        x = x + nn.Dropout(cfg.dropout)(m, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, feature


class IGPT(nn.Module):
    """The iGPT decoder. ``apply(params, tokens, ...)`` returns a `ModelOutput`.

    Decoding (``decode=True``, autoregressive models only) runs the same modules on a few positions at a time with
    a key/value cache in the "cache" collection (`init_cache`; pass it and ``mutable=["cache"]`` to `apply`):
    ``index`` (the next position) and every layer's `KVCache`; the layers run unrolled (`UnrolledBlocks`) on views
    of the same stacked parameters (or on the per-layer trees of `split_layers`).
    Here ``tokens`` are the inputs of positions index..index+t-1: the token *before* each position (the full pass's
    right shift is the caller's), the learned SOS vector at position 0 whatever the token. A call writes their keys
    and values into the cache, attends to all cached positions up to each query's own and advances ``index`` by t.
    Its logits equal the full pass's at those positions. Decoding never splits the positions over devices (the
    context's 'activation_length' rule is dropped; batch and heads shard as in training).
    """

    config: ModelConfig

    def __call__(
        self,
        tokens: jax.Array,
        *,
        bert_mask: jax.Array | None = None,
        deterministic: bool = True,
        features: bool = False,
        logits: bool = True,
        decode: bool = False,
        feature_grid: int = 1,
        prefix_len: jax.Array | None = None,
    ) -> ModelOutput:
        """Runs the decoder once.

        Args:
          tokens: int [batch, length] palette ids, length <= n_ctx (decoding: the previous token of each position).
          bert_mask: bool [batch, length], True where the BERT objective hides the token (its content embedding is
            zeroed). Only for objective 'bert'; None there means nothing is hidden.
          deterministic: disables dropout when True.
          features: also return the per-layer and final sequence-mean features (same pass, no extra memory beyond
            [batch, L + 1, d]).
          logits: compute the [batch, length, vocab] logits (probe feature extraction can skip them).
          decode: run positions index..index+length-1 against the decode cache (see the class docstring).
          feature_grid: how ``layer_features`` pool the sequence (`pool_grid`): 1 the mean over all positions (the
            paper's), 2 the means of the token grid's four quadrants, concatenated, 0 none ([batch, L + 1, length,
            d]: every token); ``final_features`` is always the mean.
          prefix_len: int [batch]: attend with the prefix-causal mask (`igpt_jax.models.attention`; autoregressive
            models only): the first prefix_len[b] positions of example b see each other, the rest causally; 0 is
            the causal model exactly, the length the whole sequence bidirectionally. None: causal. Any model may be
            run so; `ModelConfig.mask` says how it was trained.

        Returns:
          A `ModelOutput`.
        """
        cfg = self.config
        check_tokens(tokens, cfg)
        if decode and cfg.objective != "ar":
            raise ValueError(f"decode=True needs an autoregressive model (objective 'ar'); model.objective is "
                             f"{cfg.objective!r}, which has no left-to-right order to decode in")
        if decode and (features or bert_mask is not None or prefix_len is not None):
            raise ValueError("decode=True computes logits only: features, bert_mask and prefix_len are for the full "
                             "pass")
        if prefix_len is not None and cfg.objective != "ar":
            raise ValueError(f"prefix_len (the prefix-causal mask) needs an autoregressive model; model.objective is "
                             f"{cfg.objective!r}")
        if decode and self.is_initializing():
            raise ValueError("decode=True cannot initialise: make the parameters with init_params and the decode "
                             "cache with init_cache")
        with _decoding_rules() if decode else contextlib.nullcontext():
            return self._run(tokens, bert_mask, deterministic, features, logits, decode, feature_grid, prefix_len)

    @nn.compact
    def _run(self, tokens, bert_mask, deterministic, features, logits, decode, feature_grid,
             prefix_len) -> ModelOutput:
        cfg = self.config
        batch, length = tokens.shape
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        wte = _param(self, "wte", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        wpe = _param(self, "wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.d_model), ("position", "embed"), pdt)
        sos = _param(self, "sos", nn.initializers.normal(0.02), (cfg.d_model,), ("embed",), pdt)

        emb = jnp.take(wte, tokens, axis=0).astype(dt)  # [b, t, d]
        index = None
        if decode:
            cache_index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            index = cache_index.value
            cache_index.value = index + length
            first = (index + jnp.arange(length) == 0)[None, :, None]  # position 0 takes SOS
            x = jnp.where(first, sos.astype(dt), emb)
            x = x + jax.lax.dynamic_slice_in_dim(wpe, index, length, axis=0).astype(dt)[None]
        elif cfg.objective == "ar":
            if bert_mask is not None:
                raise ValueError("bert_mask was given to a model whose objective is 'ar'")
            start = jnp.broadcast_to(sos.astype(dt), (batch, 1, cfg.d_model))
            x = jnp.concatenate([start, emb[:, :-1]], axis=1)  # right shift: position i sees tokens < i
            x = x + wpe[:length].astype(dt)[None]
        else:
            if bert_mask is not None:
                if bert_mask.shape != tokens.shape:
                    raise ValueError(f"bert_mask has shape {bert_mask.shape}, expected the tokens' shape "
                                     f"{tokens.shape}")
                emb = jnp.where(bert_mask[..., None], jnp.zeros((), dt), emb)
            x = emb + wpe[:length].astype(dt)[None]
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

        per_layer = None
        if decode:  # the same blocks, one after another, each with its own cache (see `UnrolledBlocks`)
            unstack = functools.partial(_unstack_layers, n_layer=cfg.n_layer)
            x = nn.map_variables(UnrolledBlocks, "params", trans_in_fn=unstack)(cfg, name="blocks")(x, index)
        else:
            block = Block
            if cfg.remat != "none":
                block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=False)
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),  # index (None), prefix_len: the same for every layer
                length=cfg.n_layer,
                unroll=scan_unroll_for(cfg),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, feature_grid=feature_grid, name="blocks")
            x, per_layer = blocks(x, None, prefix_len)  # per_layer: [L, b, grid^2 * d]

        h = RMSNorm(cfg, name="ln_f")(x)
        wtet = _param(self, "wtet", nn.initializers.zeros, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        out_logits = None
        if logits:
            out_logits = jnp.einsum("btd,vd->btv", h, wtet.astype(dt), preferred_element_type=jnp.float32)
            out_logits = nn.with_logical_constraint(
                out_logits, ("activation_batch", "activation_length", "activation_vocab")
            )
        layer_features = final_features = None
        if features:
            final_features = jnp.mean(h.astype(jnp.float32), axis=1)  # [b, d]
            pooled = final_features if feature_grid == 1 else pool_grid(h, feature_grid)
            layer_features = jnp.concatenate([jnp.swapaxes(per_layer, 0, 1), pooled[:, None]], axis=1)
        return ModelOutput(out_logits, layer_features, final_features)


def scan_unroll_for(cfg: ModelConfig, platform: str | None = None) -> int:
    """The layer scan's unroll factor: ``cfg.scan_unroll``, or for 0 the whole stack on CPU and 1 elsewhere.

    ``platform`` defaults to the platform of the mesh in context (`attention.current_platform`), so a step compiled
    ahead of time for a TPU slice on a CPU host keeps the rolled scan.
    """
    if cfg.scan_unroll:
        return cfg.scan_unroll
    return cfg.n_layer if (platform or attention_lib.current_platform()) == "cpu" else 1


class UnrolledBlocks(nn.Module):
    """Decoding's layer stack: the same `Block`s (decode mode), one after another, named "0".."L-1".

    `IGPT` gives it views of the scanned, stacked block parameters (`nn.map_variables` with `_unstack_layers`), so
    the parameter tree is the training one. Unrolled, not scanned, so that every layer's `KVCache` is its own array,
    updated in place: a scan would stack the caches [n_layer, ...], and XLA:CPU then copies each layer's whole cache
    out of the stack and back every step (about 10x slower decoding in bench/bench_sampling.py).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, index: jax.Array) -> jax.Array:
        for layer in range(self.config.n_layer):
            x, _ = Block(self.config, decode=True, name=str(layer))(x, index)
        return x


def _unstack_layers(variables: Any, *, n_layer: int) -> Any:
    """{collection: stacked [n_layer, ...] block tree} -> {collection: {"0": layer 0's tree, ...}}; a collection
    already split (`split_layers`) passes as it is."""
    names = {str(layer) for layer in range(n_layer)}
    return {col: tree if set(tree) == names else _layer_trees(tree, n_layer) for col, tree in variables.items()}


def _layer_trees(stacked: Any, n_layer: int) -> dict[str, Any]:
    return {str(layer): jax.tree.map(lambda a, i=layer: a[i], nn.meta.unbox(stacked)) for layer in range(n_layer)}


def split_layers(params: Any) -> Any:
    """The parameters (unboxed) with ``blocks`` split into per-layer trees {"0": ..., "1": ...}, for decoding.

    `IGPT` with decode=True takes the blocks stacked (as trained) or split; split them once, outside a decode loop,
    so that the compiled loop does not slice every layer's weights out of the stacked arrays at every step (XLA
    leaves those slices in the loop: ~20% of a step in bench/bench_sampling.py). The full pass needs them stacked.
    """
    params = dict(nn.meta.unbox(params))
    if "attn" in params["blocks"]:  # stacked, not split yet
        params["blocks"] = _layer_trees(params["blocks"], jax.tree.leaves(params["blocks"])[0].shape[0])
    return params


def _decoding_rules():
    """The context's logical rules with 'activation_length' unsplit: decoding never splits the positions (a step
    has one), also under sequence parallelism; everything else shards as in training."""
    rules = nn.get_logical_axis_rules()
    return nn.logical_axis_rules(tuple((name, None if name == "activation_length" else axes) for name, axes in rules))


def init_cache(cfg: ModelConfig, batch: int) -> Any:
    """An empty decode cache for `batch` sequences: `IGPT`'s "cache" collection with decode=True, zeros.

    Tree: ``index`` int32 [] (the next position, 0) and ``blocks/<layer>/attn/cache/{key,value}``, one [batch,
    heads, n_ctx, head_dim] array per layer in the compute dtype, constrained to `CACHE_AXES` under a mesh and
    rules context.
    """
    tokens = jnp.zeros((batch, 1), jnp.int32)

    def filled(params: Any) -> Any:
        return IGPT(cfg).apply({"params": params}, tokens, decode=True, mutable=["cache"])[1]["cache"]

    shapes = jax.eval_shape(filled, nn.meta.unbox(abstract_params(cfg)))

    def zeros(shape: jax.ShapeDtypeStruct) -> jax.Array:
        z = jnp.zeros(shape.shape, shape.dtype)
        return nn.with_logical_constraint(z, CACHE_AXES) if z.ndim == len(CACHE_AXES) else z

    return jax.tree.map(zeros, shapes)


def check_tokens(tokens: Any, cfg: ModelConfig) -> None:
    """Checks token shape (always) and values (when concrete) before anything is traced into XLA.

    Raises:
      ValueError: naming the offending value and what was expected.
    """
    shape = np.shape(tokens)
    if len(shape) != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {shape}")
    if shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {shape[1]} is longer than the model's context n_ctx={cfg.n_ctx}")
    if shape[1] < 1:
        raise ValueError("sequence length must be at least 1")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be integer palette ids, got dtype {jnp.result_type(tokens)}")
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= cfg.vocab_size):
        bad = values[(values < 0) | (values >= cfg.vocab_size)]
        raise ValueError(
            f"token id {int(bad.flat[0])} is outside the vocabulary [0, {cfg.vocab_size}) "
            f"({bad.size} out-of-range ids in the batch)"
        )


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Initialises the (logically annotated) parameter tree for a full-context input."""
    tokens = jnp.zeros((1, cfg.n_ctx), jnp.int32)
    return IGPT(cfg).init({"params": rng}, tokens)["params"]


def abstract_params(cfg: ModelConfig) -> Any:
    """Parameter shapes (with their logical annotations) without allocating anything."""
    return jax.eval_shape(lambda rng: init_params(cfg, rng), jax.random.key(0))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, from `abstract_params` (no allocation)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))
