"""Every attention implementation computes the same function: values and gradients, and whole-model logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax.models import attention as attention_lib
from igpt_jax.models.igpt import IGPT, ModelConfig, init_params
from igpt_jax.models.objectives import lm_loss

ATOL, RTOL = 2e-5, 1e-5
# LLVM's backend optimisation takes most of XLA:CPU's compile time and these tests are about numerics: compile
# at level 0 (3-4x faster). One case (the first causal shape) keeps the default level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jitted(fn, *args, fast=True):
    """jax.jit(fn)(*args), compiled with FAST_COMPILE unless ``fast`` is False."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE if fast else None)(*args)


def _qkvw(shape, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


def _value_and_grads(fn, q, k, v, w, fast=True):
    """Attention output and the gradients of sum(out * w) with respect to q, k, v (one jitted computation)."""

    def run(q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(w.astype(out.dtype)))

    return run_jitted(run, q, k, v, w, fast=fast)


def _assert_same(got, want, atol=ATOL, rtol=RTOL):
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=atol, rtol=rtol,
                                   err_msg=name)


def _xla(causal):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _dense(causal):
    return lambda q, k, v: attention_lib.dense_attention(q, k, v, causal=causal)


def _blockwise(causal, block):
    return lambda q, k, v: attention_lib.blockwise_attention(q, k, v, causal=causal, block_size=block)


# (batch, length, heads, head_dim, block): several blocks, one block, a block longer than the sequence, odd sizes.
SHAPES = [(2, 64, 2, 8, 16), (1, 48, 3, 4, 16), (1, 24, 1, 8, 64), (2, 32, 4, 16, 32)]


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "b{}_t{}_h{}_d{}_blk{}".format(*s))
def test_causal_dense_blockwise_xla_agree(shape):
    b, t, h, d, block = shape
    q, k, v, w = _qkvw((b, t, h, d), seed=t + block)
    fast = shape != SHAPES[0]
    want = _value_and_grads(_xla(True), q, k, v, w, fast=fast)
    _assert_same(_value_and_grads(_dense(True), q, k, v, w, fast=fast), want)
    _assert_same(_value_and_grads(_blockwise(True, block), q, k, v, w, fast=fast), want)


@pytest.mark.parametrize("shape", SHAPES[1::2], ids=lambda s: "b{}_t{}_h{}_d{}_blk{}".format(*s))
def test_bidirectional_dense_blockwise_xla_agree(shape):
    b, t, h, d, block = shape
    q, k, v, w = _qkvw((b, t, h, d), seed=2 * t + block)
    want = _value_and_grads(_xla(False), q, k, v, w)
    _assert_same(_value_and_grads(_dense(False), q, k, v, w), want)
    _assert_same(_value_and_grads(_blockwise(False, block), q, k, v, w), want)


def test_causal_masking_is_exact():
    """Changing future keys/values changes nothing before them (and the first query sees only itself)."""
    q, k, v, _ = _qkvw((1, 32, 2, 8), seed=3)
    fn = jax.jit(_blockwise(True, 8)).lower(q, k, v).compile(FAST_COMPILE)
    out = fn(q, k, v)
    k2, v2 = k.at[:, 20:].set(7.0), v.at[:, 20:].set(-3.0)
    np.testing.assert_array_equal(np.asarray(fn(q, k2, v2))[:, :20], np.asarray(out)[:, :20])
    np.testing.assert_allclose(np.asarray(out)[:, 0], np.asarray(v)[:, 0], atol=1e-6)


def test_large_scores_stay_finite():
    q, k, v, w = _qkvw((1, 16, 2, 8), seed=4)
    q, k = 10 * q, 10 * k  # scores of a few hundred: near one-hot rows, exp() far below float32's range
    got = _value_and_grads(_blockwise(True, 8), q, k, v, w)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
    # float32 scores of size ~300 carry absolute errors ~3e-5 that exp() passes on; hence the looser tolerance.
    _assert_same(got, _value_and_grads(_dense(True), q, k, v, w), atol=1e-3, rtol=1e-3)


def test_bfloat16_inputs_run_and_stay_close():
    q, k, v, w = _qkvw((1, 16, 2, 8), seed=5, dtype=jnp.bfloat16)
    got = _value_and_grads(_blockwise(True, 8), q, k, v, w)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    want = _value_and_grads(_dense(True), *(x.astype(jnp.float32) for x in (q, k, v)), w)
    _assert_same(got, want, atol=5e-2, rtol=5e-2)


def test_dispatch_matches_direct_calls():
    q, k, v, _ = _qkvw((1, 16, 2, 8), seed=6)

    def all_impls(q, k, v):
        return {(impl, causal): attention_lib.attention(q, k, v, causal=causal, implementation=impl, block_size=8)
                for impl in ("auto", "dense", "blockwise", "xla") for causal in (True, False)}

    results = run_jitted(all_impls, q, k, v)
    for (impl, causal), got in results.items():
        want = results["dense", causal]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"{impl} causal={causal}")


def test_blockwise_falls_back_to_dense_for_cross_lengths():
    q, _, _, _ = _qkvw((1, 4, 2, 8), seed=7)
    _, k, v, _ = _qkvw((1, 12, 2, 8), seed=8)
    got, want = run_jitted(lambda q, k, v: (
        attention_lib.attention(q, k, v, causal=True, implementation="blockwise", block_size=4),
        attention_lib.dense_attention(q, k, v, causal=True)), q, k, v)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("block", [5, 0, -8, 2.0])
def test_invalid_block_size_is_an_error(block):
    q, k, v, _ = _qkvw((1, 32, 1, 4))
    with pytest.raises(ValueError, match="block_size"):
        attention_lib.blockwise_attention(q, k, v, causal=True, block_size=block)
    if block == 5:  # through the dispatcher too
        with pytest.raises(ValueError, match="not a multiple of block_size 5"):
            attention_lib.attention(q, k, v, causal=True, implementation="blockwise", block_size=5)


def test_resolve_implementation(monkeypatch):
    resolve = attention_lib.resolve_implementation
    assert jax.default_backend() == "cpu"
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=f32) == "blockwise"
    assert resolve("auto", causal=False, length=1024, block_size=128, dtype=f32) == "blockwise"
    assert resolve("auto", causal=True, length=64, block_size=128, dtype=f32) == "blockwise"  # one capped block
    assert resolve("auto", causal=True, length=100, block_size=64, dtype=f32) == "dense"  # blocks do not fit
    for name in ("dense", "blockwise", "xla", "cudnn"):
        assert resolve(name, causal=True, length=100, block_size=64, dtype=f32) == name
    with pytest.raises(ValueError, match="not one of"):
        resolve("flash", causal=True, length=64, block_size=16, dtype=f32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=bf16) == "cudnn"
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=f32) == "dense"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=f32) == "splash"
    # Splash's blocks (512 by default) must divide the per-shard query length and the key length.
    assert resolve("auto", causal=True, length=4096, block_size=128, dtype=f32, q_shards=8) == "splash"
    assert resolve("auto", causal=True, length=2304, block_size=128, dtype=f32) == "dense"  # 48x48
    assert resolve("auto", causal=True, length=2304, block_size=128, dtype=f32, splash_blocks=(256, 256)) == "splash"
    assert resolve("auto", causal=True, length=9216, block_size=128, dtype=f32, q_shards=2) == "splash"  # 96x96
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=f32, q_shards=3) == "dense"
    assert resolve("auto", causal=True, length=64, block_size=128, dtype=f32) == "dense"  # key block < 128 lanes
    # The platform of the mesh wins over the default backend (the compile job lowers for TPU on a CPU).
    assert resolve("auto", causal=True, length=1024, block_size=128, dtype=f32, platform="cpu") == "blockwise"


def test_splash_fit_reasons_name_the_numbers():
    assert attention_lib.splash_blocks_fit(4096, 2, 512, 512) is None
    assert "per-shard length 1152" in attention_lib.splash_blocks_fit(2304, 2, 512, 512)
    assert "block_kv 512 does not divide the key length 2304" in attention_lib.splash_blocks_fit(2304, 1, 256, 512)
    assert "does not split into 3 sequence shards" in attention_lib.splash_blocks_fit(1024, 3, 128, 128)
    assert "not a multiple of the kernel's 128 lanes" in attention_lib.splash_blocks_fit(64, 1, 64, 64)
    q, k, v, _ = _qkvw((1, 384, 1, 8))
    with pytest.raises(ValueError, match="choose model.splash_block_q/kv"):
        attention_lib.splash_attention(q, k, v, causal=True, block_q=256, block_kv=128)


def _splash(causal, block_q, block_kv):
    return lambda q, k, v: attention_lib.splash_attention(q, k, v, causal=causal, block_q=block_q, block_kv=block_kv)


# The Pallas TPU kernel itself, run in interpret mode on the CPU (the platform is not 'tpu'): outputs and gradients
# equal dense attention's at 1e-5 in float32. (batch, length, heads, head_dim, block_q, block_kv): several blocks
# per row and column, unequal query and key blocks, blocks capped at the sequence.
SPLASH_SHAPES = [(2, 256, 2, 16, 128, 128), (1, 256, 3, 8, 64, 128), (1, 128, 2, 32, 512, 512)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", SPLASH_SHAPES, ids=lambda s: "b{}_t{}_h{}_d{}_bq{}_bkv{}".format(*s))
def test_splash_interpret_equals_dense(shape, causal):
    b, t, h, d, block_q, block_kv = shape
    q, k, v, w = _qkvw((b, t, h, d), seed=t + h + block_q)
    want = _value_and_grads(_dense(causal), q, k, v, w)
    _assert_same(_value_and_grads(_splash(causal, block_q, block_kv), q, k, v, w), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_splash_under_shard_map_splits_batch_heads_and_queries(causal):
    """On a (data 2, context 2, tensor 2) mesh of fake CPU devices: the kernel runs per shard (queries split, keys
    and values gathered, each shard's rows of the mask) and still equals dense attention."""
    from igpt_jax import sharding  # noqa: PLC0415

    q, k, v, w = _qkvw((2, 256, 4, 16), seed=11)
    want = _value_and_grads(_dense(causal), q, k, v, w)
    mesh = sharding.make_mesh((2, 1, 2, 2), jax.devices()[:8])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert attention_lib.sequence_shards() == 2
        got = _value_and_grads(_splash(causal, 64, 128), q, k, v, w)
        jaxpr = jax.make_jaxpr(_splash(causal, 64, 128))(q, k, v)
    assert "shard_map" in str(jaxpr)
    _assert_same(got, want, atol=1e-5, rtol=1e-5)


def _small_cfg(**kw):
    base = dict(vocab_size=16, n_ctx=32, d_model=16, n_head=2, n_layer=2, attention_block=16, remat="none")
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_case():
    """Parameters (wtet made non-zero: it is zero-initialised, which would make all logits 0) and tokens."""
    cfg = _small_cfg()
    params = nn.meta.unbox(run_jitted(lambda rng: init_params(cfg, rng), jax.random.key(0)))
    params = dict(params, wtet=0.05 * jax.random.normal(jax.random.key(1), params["wtet"].shape))
    tokens = jax.random.randint(jax.random.key(2), (2, cfg.n_ctx), 0, cfg.vocab_size)
    return cfg, params, tokens


def _logits_and_grads(cfg, params, tokens):
    def run(params):
        rng = jax.random.key(4)  # the BERT mask comes from it: the same for every implementation
        bert_mask = None
        if cfg.objective == "bert":
            bert_mask = jax.random.bernoulli(rng, cfg.bert_mask_rate, tokens.shape)
        logits = IGPT(cfg).apply({"params": params}, tokens, bert_mask=bert_mask).logits
        return logits, jax.grad(lambda p: lm_loss(cfg, p, tokens, rng)[0])(params)

    return run_jitted(run, params)


def _assert_same_model(got, want, label):
    np.testing.assert_allclose(got[0], want[0], atol=ATOL, rtol=RTOL, err_msg=f"{label} logits")
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=1e-4, err_msg=f"{label} grad {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def dense_ar(model_case):
    cfg, params, tokens = model_case
    return _logits_and_grads(cfg.replace(attention="dense"), params, tokens)


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_model_logits_and_gradients_agree_causal(model_case, dense_ar, impl):
    cfg, params, tokens = model_case
    _assert_same_model(_logits_and_grads(cfg.replace(attention=impl), params, tokens), dense_ar, impl)


def test_model_logits_and_gradients_agree_bidirectional(model_case):
    cfg, params, tokens = model_case
    cfg = cfg.replace(objective="bert")
    want = _logits_and_grads(cfg.replace(attention="dense"), params, tokens)
    _assert_same_model(_logits_and_grads(cfg.replace(attention="blockwise"), params, tokens), want, "blockwise bert")


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_model_splash_logits_and_gradients_agree(objective):
    """The whole model with splash (interpret mode; a context of 128, the kernel's smallest key block) vs dense."""
    cfg = _small_cfg(n_ctx=128, objective=objective, splash_block_q=64, splash_block_kv=128)
    params = nn.meta.unbox(run_jitted(lambda rng: init_params(cfg, rng), jax.random.key(0)))
    params = dict(params, wtet=0.05 * jax.random.normal(jax.random.key(1), params["wtet"].shape))
    tokens = jax.random.randint(jax.random.key(2), (2, cfg.n_ctx), 0, cfg.vocab_size)
    want = _logits_and_grads(cfg.replace(attention="dense"), params, tokens)
    _assert_same_model(_logits_and_grads(cfg.replace(attention="splash"), params, tokens), want, f"splash {objective}")


def test_model_blockwise_under_full_remat(model_case, dense_ar):
    cfg, params, tokens = model_case
    got = _logits_and_grads(cfg.replace(attention="blockwise", remat="full"), params, tokens)
    _assert_same_model(got, dense_ar, "blockwise remat=full")
