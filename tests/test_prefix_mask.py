"""The prefix-causal mask (``model.mask='prefix'``, AIM): dense and blockwise attention equal a dense reference mask
in outputs and gradients, prefix length 0 is the causal model exactly, the loss ignores the prefix positions, and
decoding, BERT and the bad settings are refused or unaffected."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax.models import attention as attention_lib
from igpt_jax.models import objectives
from igpt_jax.models.igpt import IGPT, ModelConfig, init_params

FAST_COMPILE = {"xla_backend_optimization_level": 0}
PREFIX = np.array([0, 5, 11, 16], np.int32)  # none, inside a block, past a block boundary, the whole sequence


def _reference(q, k, v, prefix):
    """Softmax attention under the mask built densely, position by position, in numpy: key j is visible to query
    i of example b when j <= i or j < prefix[b]."""
    length = q.shape[1]
    allowed = np.zeros((len(prefix), length, length), bool)
    for b, p in enumerate(prefix):
        for i in range(length):
            for j in range(length):
                allowed[b, i, j] = j <= i or j < p
    scores = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    scores = jnp.where(jnp.asarray(allowed)[:, None], scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _jitted(fn, *args):
    """fn(*args) jitted, compiled at backend optimisation level 0 (these tests are about numerics)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _value_and_grads(fn, q, k, v, w):
    def run(q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(w))

    return _jitted(run, q, k, v, w)


@pytest.mark.parametrize("impl,save_weights", [("dense", True), ("blockwise", True), ("blockwise", False)])
def test_prefix_attention_equals_a_dense_reference_mask_in_outputs_and_gradients(impl, save_weights):
    q, k, v, w = (jax.random.normal(key, (4, 16, 2, 8)) for key in jax.random.split(jax.random.key(0), 4))
    prefix = jnp.asarray(PREFIX)
    if impl == "dense":
        def fn(q, k, v):
            return attention_lib.attention(q, k, v, causal=True, implementation="dense", prefix_len=prefix)
    else:
        def fn(q, k, v):
            return attention_lib.blockwise_attention(q, k, v, causal=True, block_size=4, prefix_len=prefix,
                                                     save_weights=save_weights)
    got = _value_and_grads(fn, q, k, v, w)
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, PREFIX), q, k, v, w)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5, err_msg=name)
    # The prefix changes the function: without it the outputs differ (the test could fail).
    causal = attention_lib.dense_attention(q, k, v, causal=True)
    assert not np.allclose(got[0], causal, atol=1e-3)


def test_splash_and_xla_fall_back_to_dense_for_the_prefix_mask():
    q, k, v = (jax.random.normal(key, (4, 16, 2, 8)) for key in jax.random.split(jax.random.key(1), 3))
    prefix = jnp.asarray(PREFIX)
    want = attention_lib.dense_attention(q, k, v, causal=True, prefix_len=prefix)
    for impl in ("xla", "splash"):
        got = attention_lib.attention(q, k, v, causal=True, implementation=impl, prefix_len=prefix)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="needs causal"):
        attention_lib.attention(q, k, v, causal=False, prefix_len=prefix)


def _model(attention: str, mask: str = "prefix") -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(vocab_size=16, n_ctx=16, d_model=16, n_head=2, n_layer=1, remat="none", attention=attention,
                      attention_block=4, mask=mask)

    def perturbed(key):  # wtet starts at zero (all logits 0): perturb every parameter so that the logits vary
        leaves, tree = jax.tree.flatten(nn.meta.unbox(init_params(cfg, key)))
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys)])

    return cfg, _jitted(perturbed, jax.random.key(1))


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_prefix_length_zero_is_the_causal_model_exactly(attention):
    cfg, params = _model(attention)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 16)

    def run(params, tokens):
        causal = IGPT(cfg.replace(mask="causal")).apply({"params": params}, tokens, features=True)
        zero = IGPT(cfg).apply({"params": params}, tokens, features=True, prefix_len=jnp.zeros(2, jnp.int32))
        whole = IGPT(cfg).apply({"params": params}, tokens, prefix_len=jnp.full(2, 16, jnp.int32))
        return causal, zero, whole

    causal, zero, whole = _jitted(run, params, tokens)
    np.testing.assert_array_equal(zero.logits, causal.logits)
    np.testing.assert_array_equal(zero.layer_features, causal.layer_features)
    assert not np.allclose(whole.logits, causal.logits, atol=1e-4)  # a prefix changes them


def test_loss_ignores_prefix_positions_and_scores_the_rest():
    cfg, params = _model("dense")
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 16), 0, 16))
    prefix = jnp.asarray([3, 9], jnp.int32)

    def run(params, tokens):
        loss, aux = objectives.lm_loss(cfg, params, tokens, jax.random.key(0), prefix_len=prefix)
        logits = IGPT(cfg).apply({"params": params}, tokens, prefix_len=prefix).logits
        grad = jax.grad(lambda lg: objectives.masked_mean(  # d loss / d logits
            objectives.token_nll(lg, tokens), objectives.loss_weights(tokens, None, None, prefix))[0])(logits)
        return loss, aux["count"], objectives.token_nll(logits, tokens), grad

    loss, count, nll, grad = _jitted(run, params, jnp.asarray(tokens))
    assert float(count) == (16 - 3) + (16 - 9)
    # The same loss by hand: the prefix-masked forward pass's NLL averaged over the positions after each prefix.
    nll = np.asarray(nll)
    np.testing.assert_allclose(float(loss), (nll[0, 3:].sum() + nll[1, 9:].sum()) / float(count), rtol=1e-6)
    # The loss has zero gradient with respect to the prefix positions' logits, and not to the others'.
    assert np.all(np.asarray(grad)[0, :3] == 0) and np.all(np.asarray(grad)[1, :9] == 0)
    assert np.all(np.abs(np.asarray(grad)[0, 3:]).sum(-1) > 0)


def test_training_draws_prefix_lengths_in_the_configured_range():
    cfg = ModelConfig(vocab_size=16, n_ctx=16, d_model=16, n_head=2, n_layer=1, mask="prefix", prefix_min=2,
                      prefix_max=6)
    drawn = np.asarray(objectives.sample_prefix_len(jax.random.key(0), 4000, cfg))
    assert drawn.min() == 2 and drawn.max() == 6 and set(np.unique(drawn)) == {2, 3, 4, 5, 6}
    assert ModelConfig(n_ctx=16, mask="prefix").prefix_range == (0, 15)
    bert_mask, prefix = objectives.training_masks(jax.random.key(0), jnp.zeros((3, 16), jnp.int32), cfg)
    assert bert_mask is None and prefix.shape == (3,)
    assert objectives.training_masks(jax.random.key(0), jnp.zeros((3, 16), jnp.int32),
                                     cfg.replace(mask="causal")) == (None, None)


@pytest.mark.parametrize("overrides,match", [
    ({"mask": "diagonal"}, "model.mask='diagonal'"),
    ({"mask": "prefix", "objective": "bert"}, "needs model.objective='ar'"),
    ({"prefix_min": 5, "prefix_max": 3}, "prefix_min=5"),
    ({"prefix_max": 16}, "prefix_max=16"),
])
def test_bad_prefix_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(n_ctx=16, **overrides)


def test_decoding_and_bert_refuse_a_prefix():
    cfg, params = _model("dense")
    with pytest.raises(ValueError, match="prefix_len"):
        IGPT(cfg).apply({"params": params}, jnp.zeros((1, 1), jnp.int32), decode=True,
                        prefix_len=jnp.zeros(1, jnp.int32), mutable=["cache"])
    bert = cfg.replace(mask="causal", objective="bert")
    with pytest.raises(ValueError, match="autoregressive"):
        IGPT(bert).apply({"params": params}, jnp.zeros((1, 16), jnp.int32), prefix_len=jnp.zeros(1, jnp.int32))
