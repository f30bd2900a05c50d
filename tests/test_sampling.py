"""KV-cached sampling: exact logits against the full forward pass, greedy recall of a memorised pattern, top-k and
temperature, sharded decoding, bad input, and the sample job's PNG grid and token arrays."""

import functools
import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from tiny_runs import write_checkpoint

from igpt_jax import sharding
from igpt_jax.jobs import sample
from igpt_jax.models import decoding as sampling
from igpt_jax.models import igpt as model_lib
from igpt_jax.models import objectives
from igpt_jax.models.igpt import IGPT, ModelConfig, init_params

CFG = ModelConfig(vocab_size=16, n_ctx=32, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense")
SETTINGS = dict(temperature=0.8, top_k=5)


@functools.cache
def random_model():
    """CFG's own initialisation, with the zero-initialised output projection made random (logits ~ N(0, 1))."""
    params = jax.jit(lambda rng: nn.meta.unbox(init_params(CFG, rng)))(jax.random.key(0))
    params["wtet"] = 0.2 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
    return params


@functools.cache
def cached_generate():
    """`generate` with SETTINGS, jitted once for the tests that share it."""
    return jax.jit(lambda p, x, r: sampling.generate(CFG, p, x, r, **SETTINGS))


def cached_logits(cfg, params, tokens, prefix_length):
    """Logits of every position: one prefill over the prefix, then one cached step per remaining position."""
    batch, n = tokens.shape
    prefill = jax.jit(lambda p, x, c: sampling.prefill(cfg, p, x, c))
    step = jax.jit(lambda p, c, tok: sampling.decode_step(cfg, p, c, tok))
    logits, cache = prefill(params, tokens[:, :prefix_length], sampling.init_cache(cfg, batch))
    out = [logits]
    for position in range(prefix_length + 1, n):
        assert int(cache["index"]) == position  # the cache knows its next position
        logits, cache = step(params, cache, tokens[:, position - 1])
        out.append(logits[:, None])
    return jnp.concatenate(out, axis=1)


def test_cached_decoding_gives_the_full_forward_logits_at_every_position():
    # The full pass uses blockwise causal attention (the CPU default); the prefill of 1 or 21 positions and the
    # one-token steps use their own paths. Same parameter tree whatever the attention.
    cfg = CFG.replace(attention="blockwise", attention_block=8)
    params = random_model()
    tokens = jax.random.randint(jax.random.key(5), (3, cfg.n_ctx), 0, cfg.vocab_size)
    full = jax.jit(lambda p, t: IGPT(cfg).apply({"params": p}, t).logits)(params, tokens)
    assert float(jnp.std(full)) > 0.5  # a model whose logits say something
    for prefix_length in (0, 20):  # from SOS only, and after a prefix
        got = cached_logits(cfg, params, tokens, prefix_length)
        assert got.shape == full.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5, rtol=0,
                                   err_msg=f"prefix of {prefix_length} tokens")


def test_the_model_decodes_in_chunks_with_its_training_parameters():
    # IGPT(decode=True) on the parameter tree of the full pass: two calls of 7 and 25 positions, each writing its
    # keys/values at the cache's index and advancing it, give the full pass's logits everywhere (the second call
    # attends to the cached positions and, causally, to its own).
    params = random_model()
    tokens = jax.random.randint(jax.random.key(6), (2, CFG.n_ctx), 0, CFG.vocab_size)
    full = jax.jit(lambda p, t: IGPT(CFG).apply({"params": p}, t).logits)(params, tokens)
    inputs = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]  # position p's input is token p-1 (SOS at 0, whatever this is)
    cache = model_lib.init_cache(CFG, 2)
    assert int(cache["index"]) == 0 and sorted(cache["blocks"]) == ["0", "1"]  # one cache per layer
    assert cache["blocks"]["1"]["attn"]["cache"]["key"].shape == (2, CFG.n_head, CFG.n_ctx, CFG.head_dim)
    decode = jax.jit(lambda p, c, x: IGPT(CFG).apply({"params": p, "cache": c}, x, decode=True, mutable=["cache"]))
    got = []
    for lo, hi in ((0, 7), (7, CFG.n_ctx)):
        out, variables = decode(params, cache, inputs[:, lo:hi])
        cache = variables["cache"]
        assert int(cache["index"]) == hi
        got.append(out.logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(full), atol=1e-5, rtol=0)


def test_the_decode_cache_shards_batch_and_heads_never_positions():
    # Under sequence parallelism (positions split over 'context' in training) the cache stays whole along the
    # positions: batch over the data axes, heads over 'tensor'.
    params = random_model()
    mesh = sharding.make_mesh((2, 1, 2, 2), jax.devices()[:8])  # data, fsdp, context, tensor
    prefix = jnp.zeros((4, 5), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, cache = jax.jit(lambda p, x: sampling.prefill(CFG, p, x, sampling.init_cache(CFG, 4)))(params, prefix)
    key = cache["blocks"]["0"]["attn"]["cache"]["key"]  # [batch, heads, n_ctx, head_dim]
    assert key.sharding.spec == jax.sharding.PartitionSpec("data", "tensor")  # (fsdp has size 1); no 'context'
    assert {s.data.shape for s in key.addressable_shards} == {(2, 1, CFG.n_ctx, CFG.head_dim)}


def test_cached_generation_draws_the_same_tokens_as_recomputing_the_sequence():
    params = random_model()
    prefix = jax.random.randint(jax.random.key(2), (8, 12), 0, CFG.vocab_size)
    cached = cached_generate()(params, prefix, jax.random.key(7))
    slow = jax.jit(lambda p, x, r: sampling.generate_recompute(CFG, p, x, r, **SETTINGS))(
        params, prefix, jax.random.key(7))
    assert cached.shape == (8, CFG.n_ctx) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(slow))
    np.testing.assert_array_equal(np.asarray(cached[:, :12]), np.asarray(prefix))
    # Same seed, same tokens; another seed, other tokens.
    np.testing.assert_array_equal(np.asarray(cached_generate()(params, prefix, jax.random.key(7))), np.asarray(cached))
    assert not np.array_equal(np.asarray(cached_generate()(params, prefix, jax.random.key(8))), np.asarray(cached))


def test_the_decode_loop_reads_the_cache_in_place_and_matches_the_hand_written_decoder(bench_script, capsys):
    """bench/bench_sampling.py's peer (the decoder as hand-written before sampling ran the model's modules) draws the
    same tokens (it exits otherwise), and at batch 2 neither compiled loop copies or transposes a layer's cache."""
    bench = bench_script("bench_sampling")
    result = bench.main(["--hand_written", "--skip_recompute", "--batch=2", "--resolution=4", "--n_layer=2",
                         "--d_model=32", "--n_head=2", "--vocab=16", "--repeats=1"])
    rows = {row["path"]: row for row in result["rows"]}
    assert set(rows) == {"cached", "hand-written"}
    assert rows["cached"]["cache_moves_per_step"] == rows["hand-written"]["cache_moves_per_step"] == 0
    assert "the same tokens" in capsys.readouterr().out


def test_greedy_decoding_of_a_memorised_pattern_reproduces_it():
    cfg = ModelConfig(vocab_size=8, n_ctx=16, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense")
    pattern = jnp.asarray([[3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 0, 7, 2, 7, 1, 0]], jnp.int32)
    tx = optax.adam(1e-2, b1=0.9, b2=0.95)
    params = jax.jit(lambda rng: nn.meta.unbox(init_params(cfg, rng)))(jax.random.key(0))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(
                lambda p: objectives.lm_loss(cfg, p, pattern, jax.random.key(0))[0])(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=100)
        return params, losses

    params, losses = train(params)
    assert float(losses[-1]) < 0.01 < float(losses[0])
    greedy = jax.jit(lambda p, x, r: sampling.generate(cfg, p, x, r, temperature=0.0))
    out = greedy(params, jnp.zeros((2, 0), jnp.int32), jax.random.key(1))  # from SOS alone
    np.testing.assert_array_equal(np.asarray(out), np.tile(np.asarray(pattern), (2, 1)))


def test_temperature_zero_is_argmax_and_top_k_keeps_the_k_largest():
    logits = jax.random.normal(jax.random.key(0), (4096, 16)) * 2.0
    greedy = sampling.sample_logits(jax.random.key(1), logits, temperature=0.0, top_k=0)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(logits, -1)))
    top1 = sampling.sample_logits(jax.random.key(1), logits, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    drawn = np.asarray(sampling.sample_logits(jax.random.key(2), logits, temperature=1.0, top_k=3))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(d in row for d, row in zip(drawn, top3))
    assert len({int(d) for d, row in zip(drawn, top3) if d != row[0]}) > 1  # not just the argmax
    # Low temperature concentrates on the argmax, high temperature spreads out.
    cold = np.asarray(sampling.sample_logits(jax.random.key(3), logits, temperature=0.05, top_k=0))
    hot = np.asarray(sampling.sample_logits(jax.random.key(3), logits, temperature=100.0, top_k=0))
    assert (cold == np.asarray(greedy)).mean() > 0.95 > 0.2 > (hot == np.asarray(greedy)).mean()


def test_generation_sharded_on_a_2x2x2_mesh_equals_one_device():
    params = random_model()
    prefix = np.asarray(jax.random.randint(jax.random.key(3), (8, 12), 0, CFG.vocab_size), np.int32)
    single = cached_generate()(params, prefix, jax.random.key(0))
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
    fn = sampling.make_generate_fn(CFG, mesh, sharding.DEFAULT_RULES, shardings, **SETTINGS)
    batch_sharding = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
    out = fn(jax.device_put(params, shardings), jax.device_put(prefix, batch_sharding), jax.random.key(0))
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {s.data.shape for s in out.addressable_shards} == {(2, CFG.n_ctx)}  # 4-way over data x fsdp
    np.testing.assert_array_equal(np.asarray(out), np.asarray(single))


def test_bad_sampling_settings_are_named():
    params = None  # the settings are checked before the parameters are touched
    key = jax.random.key(0)
    too_long = jnp.zeros((1, CFG.n_ctx + 1), jnp.int32)
    with pytest.raises(ValueError, match="prefix of 33 tokens is longer than the model's context n_ctx=32"):
        sampling.generate(CFG, params, too_long, key)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        sampling.generate(CFG, params, too_long[:, :3], key, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k=17 is larger than the vocabulary"):
        sampling.generate(CFG, params, too_long[:, :3], key, top_k=17)
    with pytest.raises(ValueError, match="only autoregressive"):
        sampling.generate(CFG.replace(objective="bert"), params, too_long[:, :3], key)
    with pytest.raises(ValueError, match="decode=True needs an autoregressive model .* is 'bert'"):
        IGPT(CFG.replace(objective="bert")).apply({"params": random_model()}, too_long[:, :3], decode=True,
                                                  mutable=["cache"])
    with pytest.raises(ValueError, match="given_rows=9 gives a prefix of 72 tokens, longer than the model's context"):
        sample.resolve_given_rows(9, 8, 64)


# ------------------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_data_dir):
    """A checkpoint (state, config, palette) as pretraining writes it, at step 2, on the embedded digits."""
    config, workdir, _, _ = write_checkpoint(tmp_path_factory, digits_data_dir, step=2)
    return config, workdir


def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.verify()  # a valid, complete PNG
    return Image.open(io.BytesIO(data)).size  # (width, height)


def test_completion_grid_and_tokens_for_the_demo(run_dir, tmp_path):
    config, source = run_dir
    config = config.copy_and_resolve_references()  # the pretraining config, as the demo has it
    config.checkpoint.source_workdir = source  # the demo leaves this empty: its own workdir holds the checkpoint
    config.model.remat = "full"  # a runtime setting: the job's applies to the checkpoint's model
    config.sample.update(given_rows=-1, batch_size=4, top_k=4)
    out = tmp_path / "samples"
    result = sample.write_completion_grid(config, str(out), num_images=3, samples_per_image=2,
                                          devices=jax.devices()[:1])

    # 3 rows of [original, given half, 2 samples]; 8x8 cells enlarged 4x to 32 pixels, 2 pixels of padding.
    assert png_size(out / "completions.png") == (4 * 34 + 2, 3 * 34 + 2)
    samples, originals = np.load(out / "completions.npy"), np.load(out / "originals.npy")
    assert samples.shape == (3, 2, 64) and originals.shape == (3, 64) and samples.dtype == np.int32
    np.testing.assert_array_equal(samples[:, :, :32], np.repeat(originals[:, None, :32], 2, axis=1))
    assert samples.min() >= 0 and samples.max() < 16
    assert len({row.tobytes() for row in samples.reshape(6, 64)}) > 1
    info = json.loads((out / "sample_info.json").read_text())
    assert info["given_rows"] == 4 and info["step"] == 2 and info["images"] == 3 and info["mode"] == "complete"
    np.testing.assert_array_equal(result["samples"], samples)


def test_unconditional_sample_job(run_dir, tmp_path):
    config, source = run_dir
    config = config.copy_and_resolve_references()
    config.job = "sample"
    config.checkpoint.source_workdir = source
    config.sample.update(mode="unconditional", num_samples=5, temperature=1.0, batch_size=8)
    result = sample.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert png_size(tmp_path / "samples.png") == (3 * 34 + 2, 2 * 34 + 2)  # 5 samples in rows of 3
    tokens = np.load(tmp_path / "samples.npy")
    assert tokens.shape == (5, 64) and tokens.min() >= 0 and tokens.max() < 16
    assert len({row.tobytes() for row in tokens}) == 5
    np.testing.assert_array_equal(result["samples"], tokens)


def test_sample_job_without_a_checkpoint_names_the_workdir(run_dir, tmp_path):
    config, _ = run_dir
    config = config.copy_and_resolve_references()
    config.checkpoint.source_workdir = ""
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
        sample.run(config, str(tmp_path), devices=jax.devices()[:1])
    config.checkpoint.source_workdir = run_dir[1]
    config.checkpoint.step = 3
    with pytest.raises(FileNotFoundError, match="checkpoint step 3 is not in"):
        sample.run(config, str(tmp_path), devices=jax.devices()[:1])
    config.checkpoint.step = -1
    config.sample.given_rows = 9
    with pytest.raises(ValueError, match="given_rows=9"):
        sample.run(config, str(tmp_path), devices=jax.devices()[:1])
    config.sample.given_rows = -1
    config.sample.top_k = 17
    with pytest.raises(ValueError, match="top_k=17 is larger than the vocabulary"):
        sample.run(config, str(tmp_path), devices=jax.devices()[:1])
