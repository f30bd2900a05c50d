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

Parameter tree (shapes for L layers, width d, H heads of size k, vocabulary V, context n):
  wte [V, d]  wpe [n, d]  sos [d]  wtet [V, d]  ln_f/scale [d]
  blocks/ln_1/scale [L, d]  blocks/attn/{q,k,v} [L, d, H, k]  blocks/attn/o [L, H, k, d]
  blocks/ln_2/scale [L, d]  blocks/mlp/fc [L, d, 4d]  blocks/mlp/proj [L, 4d, d]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from igpt_jax import attention as attention_lib

OBJECTIVES = ("ar", "bert")
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
      attention: 'auto', 'dense', 'blockwise', 'xla', 'cudnn' or 'splash' (see `igpt_jax.attention`).
      attention_block: block length of the blockwise causal attention.
      splash_block_q: query block length of the splash kernel (TPU; capped at the per-shard sequence length).
      splash_block_kv: key/value block length of the splash kernel (capped at the sequence length).
      remat: rematerialisation policy of a block: 'none', 'full' (save nothing), 'dots' (save matmul outputs),
        'dots_no_batch' (save weight matmuls only), 'minimal' (save only the block's attention and MLP outputs).
      dtype: compute dtype ('float32' or 'bfloat16'); parameters, norms, softmax and logits stay float32.
      param_dtype: parameter dtype.
      norm_eps: epsilon of the RMS norm.
      dropout: residual and embedding dropout rate (the paper uses none).
      scan_unroll: `nn.scan` unroll factor over layers.
    """

    vocab_size: int = 512
    n_ctx: int = 1024
    d_model: int = 512
    n_head: int = 8
    n_layer: int = 24
    mlp_ratio: int = 4
    objective: str = "ar"
    bert_mask_rate: float = 0.15
    attention: str = "auto"
    attention_block: int = 128
    splash_block_q: int = 512
    splash_block_kv: int = 512
    remat: str = "full"
    dtype: str = "float32"
    param_dtype: str = "float32"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "n_ctx", "d_model", "n_head", "n_layer", "mlp_ratio", "attention_block",
                     "splash_block_q", "splash_block_kv", "scan_unroll"):
            positive(name)
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                f"the width must be a multiple of the number of heads"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective={self.objective!r}, expected one of {OBJECTIVES}")
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


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections and no biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
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
        out = attention_lib.attention(
            q, key, v, causal=cfg.causal, implementation=cfg.attention, block_size=cfg.attention_block,
            splash_blocks=(cfg.splash_block_q, cfg.splash_block_kv),
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
      grid: 1 for the mean over all positions (the paper's probe feature), 2 for the four quadrants, ...

    Returns:
      [batch, grid * grid * d] float32: region (row i, column j) of the grid at [(i * grid + j) * d, ... + d).
    """
    h = h.astype(jnp.float32)
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
    """One pre-norm transformer block; as a scan body it maps x -> (x', ln_1(x) pooled by `pool_grid`)."""

    config: ModelConfig
    deterministic: bool = True
    feature_grid: int = 1  # `pool_grid` of the probe feature: 1 the sequence mean, 2 the four quadrants' means

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        h = RMSNorm(cfg, name="ln_1")(x)
        feature = pool_grid(h, self.feature_grid)  # [b, grid^2 * d]: the probe feature of this layer
        a = Attention(cfg, name="attn")(h)
        x = x + nn.Dropout(cfg.dropout)(a, deterministic=self.deterministic)
        m = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="ln_2")(x))
        x = x + nn.Dropout(cfg.dropout)(m, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, feature


class IGPT(nn.Module):
    """The iGPT decoder. ``apply(params, tokens, ...)`` returns a `ModelOutput`."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        bert_mask: jax.Array | None = None,
        deterministic: bool = True,
        features: bool = False,
        logits: bool = True,
        feature_grid: int = 1,
    ) -> ModelOutput:
        """Runs the decoder once.

        Args:
          tokens: int [batch, length] palette ids, length <= n_ctx.
          bert_mask: bool [batch, length], True where the BERT objective hides the token (its content embedding is
            zeroed). Only for objective 'bert'; None there means nothing is hidden.
          deterministic: disables dropout when True.
          features: also return the per-layer and final sequence-mean features (same pass, no extra memory beyond
            [batch, L + 1, d]).
          logits: compute the [batch, length, vocab] logits (probe feature extraction can skip them).
          feature_grid: how ``layer_features`` pool the sequence (`pool_grid`): 1 the mean over all positions (the
            paper's), 2 the means of the token grid's four quadrants, concatenated; ``final_features`` is always
            the mean.

        Returns:
          A `ModelOutput`.
        """
        cfg = self.config
        check_tokens(tokens, cfg)
        batch, length = tokens.shape
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        wte = _param(self, "wte", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        wpe = _param(self, "wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.d_model), ("position", "embed"), pdt)
        sos = _param(self, "sos", nn.initializers.normal(0.02), (cfg.d_model,), ("embed",), pdt)

        emb = jnp.take(wte, tokens, axis=0).astype(dt)  # [b, t, d]
        if cfg.objective == "ar":
            if bert_mask is not None:
                raise ValueError("bert_mask was given to a model whose objective is 'ar'")
            start = jnp.broadcast_to(sos.astype(dt), (batch, 1, cfg.d_model))
            x = jnp.concatenate([start, emb[:, :-1]], axis=1)  # right shift: position i sees tokens < i
        else:
            if bert_mask is not None:
                if bert_mask.shape != tokens.shape:
                    raise ValueError(f"bert_mask has shape {bert_mask.shape}, expected the tokens' shape {tokens.shape}")
                emb = jnp.where(bert_mask[..., None], jnp.zeros((), dt), emb)
            x = emb
        x = x + wpe[:length].astype(dt)[None]
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=cfg.n_layer,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, feature_grid, name="blocks")
        x, per_layer = blocks(x)  # per_layer: [L, b, d]

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
