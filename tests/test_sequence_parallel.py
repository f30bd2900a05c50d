"""Sequence (context) parallelism: one example's tokens split over the 'context' mesh axis change nothing.

Eight fake CPU devices (tests/conftest.py); the sequence split 4 ways, the batch 2 ways: training losses and
parameters, probe features (sequence means) and cached sampling equal the one-device results.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from igpt_jax import sharding
from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.models import decoding as sampling
from igpt_jax.models.igpt import IGPT, ModelConfig, init_params
from igpt_jax.probing import features
from igpt_jax.training import optim
from igpt_jax.training import step as train

CONTEXT_MESH = (2, 1, 4, 1)  # data 2, fsdp 1, context 4, tensor 1: each sequence over 4 of the 8 devices
RULES = sharding.DEFAULT_RULES  # 'activation_length' -> 'context', 'activation_kv_length' unsharded
STEPS = 3


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense")
    return ModelConfig(**{**base, **kw})


def _mesh(shape):
    return sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])


def _train(cfg: ModelConfig, mesh_shape, batches):
    """Losses of STEPS jitted train steps (the pretraining job's function) and the final parameters."""
    train_cfg = config_defaults.base_config().train
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10)
    tx = optim.make_optimizer(train_cfg, schedule)
    mesh = _mesh(mesh_shape)
    layout = train.state_layout(cfg, tx, mesh, RULES)
    state = train.create_state(cfg, tx, layout, mesh, RULES, jax.random.key(0))
    batch_sharding = sharding.batch_sharding(mesh, RULES)
    step = train.jitted_train_step(cfg, tx, schedule, layout, batch_sharding, mesh)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        for tokens in batches:
            state, metrics = step(state, {"tokens": jax.device_put(tokens, batch_sharding)}, jax.random.key(1))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), mesh


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_training_with_the_sequence_split_4_ways_equals_one_device(objective):
    cfg = _cfg(objective=objective)
    batches = [np.asarray(jax.random.randint(jax.random.key(10 + i), (8, cfg.n_ctx), 0, 16)) for i in range(STEPS)]
    single_losses, single_params, _ = _train(cfg, (1, 1, 1, 1), batches)
    split_losses, split_params, mesh = _train(cfg, CONTEXT_MESH, batches)
    assert mesh.shape["context"] == 4
    np.testing.assert_allclose(split_losses, single_losses, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), split_params, single_params)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), single_params,
                         jax.device_get(nn.meta.unbox(init_params(cfg, jax.random.key(0)))))
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did train (Adam moves each weight by ~lr per step)


def test_the_activations_really_are_split_along_the_sequence():
    """The compiled forward pass works on [batch / 2, length / 4, ...] pieces of the residual stream and the MLP per
    device, and gathers the keys/values whole."""
    cfg = _cfg()
    mesh = _mesh(CONTEXT_MESH)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, cfg.n_ctx), 0, 16)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        hlo = jax.jit(lambda p, t: IGPT(cfg).apply({"params": p}, t).logits).lower(params, tokens).compile().as_text()
    assert f"f32[4,{cfg.n_ctx // 4},{cfg.d_model}]" in hlo
    assert f"f32[4,{cfg.n_ctx // 4},{cfg.d_mlp}]" in hlo
    assert f"f32[4,{cfg.n_ctx},{cfg.d_mlp}]" not in hlo  # the MLP never sees the whole sequence
    assert "all-gather" in hlo  # keys and values


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_probe_features_with_the_sequence_split_equal_one_device(objective):
    cfg = _cfg(objective=objective)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    params = dict(params, wtet=0.05 * jax.random.normal(jax.random.key(1), params["wtet"].shape))
    batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(2), (8, cfg.n_ctx), 0, 16), np.int32),
             "label": np.arange(8, dtype=np.int32), "mask": np.ones(8, bool), "index": np.arange(8, dtype=np.int32)}
    fn = features.features_fn(cfg, list(range(cfg.n_layer + 1)), num_masks=2, seed=0)
    results = []
    for shape in ((1, 1, 1, 1), CONTEXT_MESH):
        mesh = _mesh(shape)
        boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        shardings = sharding.logical_shardings(boxed, mesh, RULES)
        jitted = jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(mesh, RULES)),
                         out_shardings=sharding.replicated(mesh))
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            results.append(jax.device_get(jitted(jax.device_put(params, shardings), batch)))
    single, split = results
    assert single["features"].shape == (2 if objective == "bert" else 1, 8, cfg.n_layer + 1, cfg.d_model)
    np.testing.assert_allclose(split["features"], single["features"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(split["nll_sum"], single["nll_sum"], atol=1e-4, rtol=1e-6)


def test_cached_sampling_with_the_sequence_split_equals_one_device():
    cfg = _cfg()
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    params = dict(params, wtet=0.5 * jax.random.normal(jax.random.key(1), params["wtet"].shape))
    prefix = np.asarray(jax.random.randint(jax.random.key(3), (4, 12), 0, cfg.vocab_size), np.int32)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    outs = []
    for shape in ((1, 1, 1, 1), CONTEXT_MESH):
        mesh = _mesh(shape)
        shardings = sharding.logical_shardings(boxed, mesh, RULES)
        fn = sampling.make_generate_fn(cfg, mesh, RULES, shardings, temperature=1.0, top_k=4)
        prefix_dev = jax.device_put(prefix, sharding.batch_sharding(mesh, RULES))
        outs.append(np.asarray(fn(jax.device_put(params, shardings), prefix_dev, jax.random.key(0))))
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[0][:, :12], prefix)


def test_mesh_shapes_with_and_without_the_context_axis():
    assert sharding.resolve_mesh_shape((2, 1, 4, 1), 8) == (2, 1, 4, 1)
    assert sharding.resolve_mesh_shape((-1, 1, 2), 8) == (4, 1, 1, 2)  # (data, fsdp, tensor): context 1
    assert sharding.resolve_mesh_shape((1, 1, -1, 2), 8) == (1, 1, 4, 2)
    with pytest.raises(ValueError, match="must have 4 entries"):
        sharding.resolve_mesh_shape((8, 1), 8)
    assert dict(sharding.make_mesh((-1, 1, 1), jax.devices()[:8]).shape) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}


def test_the_pretraining_job_with_the_sequence_split_equals_one_device(digits_data_dir, tmp_path):
    """The whole job (input pipeline, loss, checkpointed state) on mesh (data 2, context 4) vs one device."""
    from igpt_jax.jobs import pretrain  # noqa: PLC0415

    config = config_defaults.base_config()  # digits 8x8 (64 tokens), 2 layers of width 64, auto attention
    config.data = config_defaults.default_data_config("digits")
    config.data.data_dir = digits_data_dir
    config.train.update(batch_size=16, num_steps=3, warmup_steps=1, lr=1e-3, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 3
    config_checks.resolve(config, read_data=False)
    runs = {}
    for name, shape in (("single", (1, 1, 1)), ("context", CONTEXT_MESH)):
        config.mesh.shape = shape
        devices = jax.devices()[: int(np.prod(shape))]
        runs[name] = [h["loss"] for h in pretrain.run(config, str(tmp_path / name), devices=devices)["history"]]
    assert len(runs["single"]) == 3
    np.testing.assert_allclose(runs["context"], runs["single"], atol=1e-5, rtol=0)
