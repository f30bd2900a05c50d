"""The decoder: exact parameter counts, agreement with an independent numpy reference, masks, features, init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_reference
import numpy as np
import pytest

from igpt_jax.models import objectives
from igpt_jax.models.igpt import (
    IGPT,
    Block,
    ModelConfig,
    count_params,
    init_params,
    pool_grid,
    scan_unroll_for,
)

TINY = ModelConfig(vocab_size=16, n_ctx=32, d_model=32, n_head=4, n_layer=3, remat="none", attention="dense")


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """Parameters with every leaf random (incl. the zero-initialised wtet and the unit norm gains)."""
    params = nn.meta.unbox(init_params(cfg, jax.random.key(seed)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        (1.0 + 0.2 * jax.random.normal(k, x.shape)) if x.ndim and (x == 1).all() else scale * jax.random.normal(k, x.shape)
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


def tokens_for(cfg, batch=2, length=None, seed=0):
    length = length or cfg.n_ctx
    return jax.random.randint(jax.random.key(100 + seed), (batch, length), 0, cfg.vocab_size)


@pytest.mark.parametrize(
    "size,expected",
    [((24, 512, 8), 76_571_648), ((36, 1024, 8), 455_157_760), ((48, 1536, 16), 1_362_250_752)],
    ids=["iGPT-S", "iGPT-M", "iGPT-L"],
)
def test_parameter_counts_match_the_paper_models_exactly(size, expected):
    n_layer, d_model, n_head = size
    assert count_params(ModelConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, n_ctx=1024)) == expected


def test_every_parameter_has_logical_axis_names():
    boxed = init_params(TINY, jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    assert boxed["blocks"]["attn"]["q"].names == ("layers", "embed", "heads", "kv")
    assert boxed["blocks"]["mlp"]["fc"].names == ("layers", "embed", "mlp")
    assert boxed["wte"].names == ("vocab", "embed")


@pytest.mark.parametrize("attention", ["dense", "blockwise", "xla"])
def test_ar_logits_and_features_equal_numpy_reference(attention):
    cfg = TINY.replace(attention=attention, attention_block=8)
    params = random_params(cfg)
    tokens = tokens_for(cfg, batch=3)
    out = jax.jit(lambda p, t: IGPT(cfg).apply({"params": p}, t, features=True))(params, tokens)
    ref_logits, ref_layers, ref_final = model_reference.forward(jax.device_get(params), np.asarray(tokens))
    np.testing.assert_allclose(out.logits, ref_logits, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out.layer_features[:, :-1], ref_layers, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.layer_features[:, -1], ref_final, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.final_features, ref_final, atol=1e-5, rtol=1e-5)
    assert out.layer_features.shape == (3, cfg.n_layer + 1, cfg.d_model)


def test_bert_logits_equal_numpy_reference():
    cfg = TINY.replace(objective="bert")
    params = random_params(cfg, seed=3)
    tokens = tokens_for(cfg, batch=2)
    mask = objectives.sample_bert_mask(jax.random.key(5), tokens.shape, 0.15)
    out = IGPT(cfg).apply({"params": params}, tokens, bert_mask=mask)
    ref, _, _ = model_reference.forward(jax.device_get(params), np.asarray(tokens), causal=False, bert_mask=np.asarray(mask))
    np.testing.assert_allclose(out.logits, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_changing_token_j_never_changes_logits_at_positions_up_to_j(attention):
    cfg = TINY.replace(attention=attention, attention_block=8)
    params = random_params(cfg, seed=1)
    tokens = tokens_for(cfg, batch=1)
    apply = jax.jit(lambda t: IGPT(cfg).apply({"params": params}, t).logits)
    base = apply(tokens)
    for j in (0, 7, 8, 20, cfg.n_ctx - 1):
        changed = tokens.at[0, j].set((tokens[0, j] + 1) % cfg.vocab_size)
        logits = apply(changed)
        np.testing.assert_array_equal(logits[:, : j + 1], base[:, : j + 1])
        if j + 1 < cfg.n_ctx:
            assert np.abs(logits[:, j + 1 :] - base[:, j + 1 :]).max() > 1e-4  # later positions do see it


def test_bert_loss_touches_only_masked_positions():
    cfg = TINY.replace(objective="bert")
    params = random_params(cfg, seed=2)
    tokens = tokens_for(cfg, batch=2)
    mask = objectives.sample_bert_mask(jax.random.key(7), tokens.shape, 0.15)
    assert 0 < int(mask.sum()) < mask.size
    logits = IGPT(cfg).apply({"params": params}, tokens, bert_mask=mask).logits

    def loss_of_logits(lg):
        return objectives.masked_mean(objectives.token_nll(lg, tokens), objectives.loss_weights(tokens, mask, None))[0]

    grad = jax.grad(loss_of_logits)(logits)
    per_position = np.abs(np.asarray(grad)).sum(-1)
    assert (per_position[~np.asarray(mask)] == 0).all()
    assert (per_position[np.asarray(mask)] > 0).all()
    expected = np.asarray(objectives.token_nll(logits, tokens))[np.asarray(mask)].mean()
    np.testing.assert_allclose(loss_of_logits(logits), expected, rtol=1e-6)
    # A masked token's identity is invisible to the model: its content embedding is zeroed.
    i, j = map(int, np.argwhere(np.asarray(mask))[0])
    changed = tokens.at[i, j].set((tokens[i, j] + 1) % cfg.vocab_size)
    np.testing.assert_array_equal(IGPT(cfg).apply({"params": params}, changed, bert_mask=mask).logits, logits)


def test_lm_loss_ar_is_mean_nll_over_every_position_and_respects_example_mask():
    cfg = TINY
    params = random_params(cfg, seed=4)
    tokens = tokens_for(cfg, batch=3)
    logits = IGPT(cfg).apply({"params": params}, tokens).logits
    nll = np.asarray(objectives.token_nll(logits, tokens))
    loss, aux = objectives.lm_loss(cfg, params, tokens, jax.random.key(0))
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-6)
    example_mask = jnp.array([True, False, True])
    loss, aux = objectives.lm_loss(cfg, params, tokens, jax.random.key(0), example_mask=example_mask)
    np.testing.assert_allclose(loss, nll[[0, 2]].mean(), rtol=1e-6)
    assert float(aux["count"]) == 2 * cfg.n_ctx


def test_quadrant_pooling_of_a_known_grid_equals_the_hand_computed_means():
    # An 8x8 grid in raster order whose value at (row r, column c) is 8r + c; a second channel holds -(8r + c).
    pos = jnp.arange(64, dtype=jnp.float32)
    h = jnp.stack([pos, -pos], axis=-1)[None]  # [1, 64, 2]
    # Quadrant (top-left) rows 0-3, columns 0-3: mean 8 * 1.5 + 1.5 = 13.5; +4 to the right, +32 below.
    expected = [13.5, -13.5, 17.5, -17.5, 45.5, -45.5, 49.5, -49.5]
    np.testing.assert_allclose(pool_grid(h, 2)[0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pool_grid(h, 1)[0], [31.5, -31.5], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs a square token grid whose side 2 divides; got 32 tokens"):
        pool_grid(h[:, :32], 2)


def test_quadrant_features_average_back_to_the_mean_features():
    cfg = TINY.replace(n_ctx=16, n_layer=2)  # a 4x4 token grid
    params = random_params(cfg, seed=3)
    tokens = tokens_for(cfg, batch=2)

    @jax.jit
    def both(p, t):
        def run(grid):
            return IGPT(cfg).apply({"params": p}, t, features=True, logits=False, feature_grid=grid)

        return run(1), run(2)

    mean, quad = both(params, tokens)
    assert quad.layer_features.shape == (2, cfg.n_layer + 1, 4 * cfg.d_model)
    regions = quad.layer_features.reshape(2, cfg.n_layer + 1, 4, cfg.d_model)
    np.testing.assert_allclose(regions.mean(axis=2), mean.layer_features, atol=1e-5, rtol=1e-5)
    assert not np.allclose(regions[:, :, 0], regions[:, :, 3], atol=1e-3)  # the quadrants differ
    np.testing.assert_array_equal(quad.final_features, mean.final_features)  # fine-tuning's feature stays the mean


def test_features_equal_running_the_layers_one_at_a_time():
    cfg = TINY
    params = random_params(cfg, seed=5)
    tokens = tokens_for(cfg, batch=2)
    out = IGPT(cfg).apply({"params": params}, tokens, features=True)
    # Embedding exactly as the model does it, then each block separately with its slice of the stacked parameters.
    x = jnp.concatenate(
        [jnp.broadcast_to(params["sos"], (2, 1, cfg.d_model)), params["wte"][tokens[:, :-1]]], axis=1
    ) + params["wpe"][None]
    for layer in range(cfg.n_layer):
        layer_params = jax.tree.map(lambda p, l=layer: p[l], params["blocks"])
        x, feature = Block(cfg).apply({"params": layer_params}, x)
        np.testing.assert_allclose(out.layer_features[:, layer], feature, atol=1e-6, rtol=1e-6)
    assert out.layer_features.shape == (2, cfg.n_layer + 1, cfg.d_model)


@pytest.mark.parametrize("remat", ["full", "minimal"])
def test_remat_policies_give_the_same_loss_and_gradients(remat):
    params = random_params(TINY, seed=6, scale=0.1)
    tokens = tokens_for(TINY, batch=2)

    def loss(cfg):
        return jax.jit(jax.value_and_grad(lambda p: objectives.lm_loss(cfg, p, tokens, jax.random.key(0))[0]))(params)

    base_loss, base_grad = loss(TINY)
    other_loss, other_grad = loss(TINY.replace(remat=remat))
    np.testing.assert_allclose(other_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), other_grad, base_grad)


def test_the_unrolled_layer_stack_equals_the_rolled_scan():
    """scan_unroll 0 (the default) unrolls all layers on CPU and keeps the scan rolled for a TPU slice; either way
    the loss, the gradients and the per-layer features are the scan's."""
    assert (TINY.scan_unroll, scan_unroll_for(TINY), scan_unroll_for(TINY, "tpu")) == (0, 3, 1)
    assert scan_unroll_for(TINY.replace(scan_unroll=2)) == 2
    params = random_params(TINY, seed=8, scale=0.1)
    tokens = tokens_for(TINY, batch=2)

    def run(cfg):
        def loss(p):
            return objectives.lm_loss(cfg, p, tokens, jax.random.key(0))[0]

        features = IGPT(cfg).apply({"params": params}, tokens, features=True, logits=False).layer_features
        return jax.jit(jax.value_and_grad(loss))(params), features

    (rolled_loss, rolled_grad), rolled_features = run(TINY.replace(scan_unroll=1))
    (loss, grad), features = run(TINY)
    np.testing.assert_allclose(loss, rolled_loss, rtol=1e-6)
    np.testing.assert_allclose(features, rolled_features, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grad, rolled_grad)
    with pytest.raises(ValueError, match="scan_unroll must be an integer >= 0"):
        TINY.replace(scan_unroll=-1)


def test_bfloat16_compute_is_close_to_float32():
    params = random_params(TINY, seed=7, scale=0.1)
    tokens = tokens_for(TINY, batch=2)
    f32 = IGPT(TINY).apply({"params": params}, tokens).logits
    bf16 = IGPT(TINY.replace(dtype="bfloat16")).apply({"params": params}, tokens).logits
    assert bf16.dtype == jnp.float32
    assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1 * np.abs(np.asarray(f32)).max()


def test_initialisation_follows_the_released_model():
    cfg = ModelConfig(vocab_size=512, n_ctx=256, d_model=256, n_head=8, n_layer=4)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    d, L = cfg.d_model, cfg.n_layer
    expected_std = {
        ("blocks", "attn", "q"): 1 / np.sqrt(d),
        ("blocks", "attn", "k"): 1 / np.sqrt(d),
        ("blocks", "attn", "v"): 1 / np.sqrt(d),
        ("blocks", "attn", "o"): 1 / np.sqrt(d * L),
        ("blocks", "mlp", "fc"): 0.02,
        ("blocks", "mlp", "proj"): 0.02,
        ("wte",): 0.02,
        ("wpe",): 0.01,
    }
    for path, std in expected_std.items():
        value = params
        for key in path:
            value = value[key]
        assert abs(float(np.std(value)) / std - 1) < 0.05, (path, float(np.std(value)), std)
        assert abs(float(np.mean(value))) < 0.1 * std
    assert not np.asarray(params["wtet"]).any()
    for norm in (params["ln_f"]["scale"], params["blocks"]["ln_1"]["scale"], params["blocks"]["ln_2"]["scale"]):
        np.testing.assert_array_equal(norm, 1.0)
    # Each layer gets its own random draw.
    assert not np.allclose(params["blocks"]["attn"]["q"][0], params["blocks"]["attn"]["q"][1])


def test_width_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match=r"d_model=100 is not divisible by model.n_head=8"):
        ModelConfig(d_model=100, n_head=8)


def test_out_of_vocabulary_token_is_rejected_before_tracing():
    params = random_params(TINY)
    tokens = np.zeros((1, 8), np.int32)
    tokens[0, 3] = TINY.vocab_size
    with pytest.raises(ValueError, match=r"token id 16 is outside the vocabulary \[0, 16\)"):
        IGPT(TINY).apply({"params": params}, tokens)
    tokens[0, 3] = -1
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        IGPT(TINY).apply({"params": params}, tokens)


def test_sequence_longer_than_context_is_rejected():
    params = random_params(TINY)
    with pytest.raises(ValueError, match=r"sequence length 33 is longer than the model's context n_ctx=32"):
        IGPT(TINY).apply({"params": params}, jnp.zeros((1, 33), jnp.int32))


def test_unknown_config_keys_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_embd'\]"):
        ModelConfig.from_config({"n_embd": 64})
    with pytest.raises(ValueError, match=r"model.objective='mlm'"):
        ModelConfig(objective="mlm")
    with pytest.raises(ValueError, match=r"model.attention='flash'"):
        ModelConfig(attention="flash")
