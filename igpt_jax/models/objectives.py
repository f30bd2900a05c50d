"""Training objectives of iGPT, in nats per token.

  * Autoregressive: every position i is scored on token i (the model sees tokens < i through the SOS shift).
  * BERT: each position is hidden with probability `bert_mask_rate`; the loss averages only hidden positions.
  * Prefix-causal (autoregressive with ``model.mask='prefix'``, AIM): each example draws a prefix length p uniformly
    in `ModelConfig.prefix_range`; its first p positions attend bidirectionally and are not scored (they may see
    their own targets), positions p.. are scored as in the autoregressive objective.

`example_mask` ([batch] bool) marks real examples, so that padded evaluation batches are exact.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from igpt_jax.models.igpt import IGPT, ModelConfig, ModelOutput


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target under float32 logits; [batch, length]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sample_bert_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Independent Bernoulli(rate) mask, True where a token is hidden."""
    return jax.random.bernoulli(rng, rate, shape)


def sample_prefix_len(rng: jax.Array, batch: int, cfg: ModelConfig) -> jax.Array:
    """One prefix length per example, uniform in `ModelConfig.prefix_range` (inclusive): int32 [batch]."""
    low, high = cfg.prefix_range
    return jax.random.randint(rng, (batch,), low, high + 1, dtype=jnp.int32)


def training_masks(rng: jax.Array, tokens: jax.Array, cfg: ModelConfig) -> tuple[jax.Array | None, jax.Array | None]:
    """(BERT mask, prefix lengths) that the objective draws for a batch from ``rng``; None where it has none."""
    if cfg.objective == "bert":
        return sample_bert_mask(rng, tokens.shape, cfg.bert_mask_rate), None
    if cfg.mask == "prefix":
        return None, sample_prefix_len(rng, tokens.shape[0], cfg)
    return None, None


def masked_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (sum(values * w) / max(sum(w), 1), sum(w))."""
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, 1.0), total


def loss_weights(tokens: jax.Array, bert_mask: jax.Array | None, example_mask: jax.Array | None,
                 prefix_len: jax.Array | None = None) -> jax.Array:
    """Which positions count: all (AR), those after the prefix (prefix-causal) or the hidden ones (BERT), of real
    examples only; [batch, length]."""
    weights = jnp.ones(tokens.shape, jnp.float32) if bert_mask is None else bert_mask.astype(jnp.float32)
    if prefix_len is not None:
        weights = weights * (jnp.arange(tokens.shape[1])[None, :] >= prefix_len[:, None]).astype(jnp.float32)
    if example_mask is not None:
        weights = weights * example_mask.astype(jnp.float32)[:, None]
    return weights


def lm_loss(
    cfg: ModelConfig,
    params: Any,
    tokens: jax.Array,
    rng: jax.Array,
    *,
    deterministic: bool = True,
    example_mask: jax.Array | None = None,
    bert_mask: jax.Array | None = None,
    normalizer: jax.Array | float | None = None,
    features: bool = False,
    prefix_len: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """The generative loss L_GEN of the configured objective.

    Args:
      cfg: the model config (its objective picks AR or BERT).
      params: the model parameters.
      tokens: int32 [batch, length].
      rng: key for the BERT mask and dropout.
      deterministic: disables dropout.
      example_mask: optional bool [batch] of real examples.
      bert_mask: the BERT mask to use (bool [batch, length]); None samples one from ``rng``.
      normalizer: divide the summed NLL by this instead of the number of scored tokens. Gradient accumulation
        passes the full batch's count so that micro-batch gradients add up to exactly the full batch's.
      features: also return the forward pass's features in aux['output'].
      prefix_len: the prefix lengths (int [batch]) of a prefix-causal model; None draws them from ``rng``.

    Returns:
      (mean loss in nats per scored token, aux) where aux has 'nll_sum' and 'count' (for exact evaluation over
      many batches) and 'output' (the `ModelOutput`, when features=True).
    """
    mask_rng, dropout_rng = jax.random.split(rng)
    drawn_mask, drawn_prefix = training_masks(mask_rng, tokens, cfg)
    if cfg.objective == "bert" and bert_mask is None:
        bert_mask = drawn_mask
    elif cfg.objective == "ar":
        bert_mask = None
    if cfg.mask != "prefix":
        prefix_len = None
    elif prefix_len is None:
        prefix_len = drawn_prefix
    out: ModelOutput = IGPT(cfg).apply(
        {"params": params},
        tokens,
        bert_mask=bert_mask,
        deterministic=deterministic,
        features=features,
        prefix_len=prefix_len,
        rngs={"dropout": dropout_rng},
    )
    nll = token_nll(out.logits, tokens)
    weights = loss_weights(tokens, bert_mask, example_mask, prefix_len)
    loss, count = masked_mean(nll, weights)
    nll_sum = jnp.sum(nll * weights)
    if normalizer is not None:
        loss = nll_sum / normalizer
    aux = {"nll_sum": nll_sum, "count": count}
    if features:
        aux["output"] = out
    return loss, aux
