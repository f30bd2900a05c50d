"""The attentive probe (``probe.head='attentive'``): AIM's head equals its projections written out, it separates
tokens that a mean-pooled linear probe cannot, averaged layers are the mean of the per-layer token features, the
bfloat16 stores round-trip, and the probe job reports the head beside the linear probe."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax.models.igpt import IGPT, ModelConfig, init_params
from igpt_jax.probing import attentive, features, linear_probe
from igpt_jax.probing import token_store as store_lib


def _aim_reference(params, x):
    """The head as apple/ml-aim writes it, in numpy: project every token to keys and values, one query per head,
    softmax over the tokens, the heads' outputs concatenated, then the linear layer."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    heads, k = p["query"].shape
    keys = np.einsum("bnc,chk->bhnk", x, p["wk"])
    values = np.einsum("bnc,chk->bhnk", x, p["wv"])
    scores = np.einsum("hk,bhnk->bhn", p["query"], keys) / np.sqrt(k)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = np.einsum("bhn,bhnk->bhk", attn, values).reshape(len(x), heads * k)
    return out @ p["w"] + p["b"]


def test_head_equals_the_projections_written_out():
    rng = np.random.default_rng(0)
    params = attentive.init_head(jax.random.key(0), width=6, heads=4, num_classes=3)  # k = 2: 4 x 2 = 8 outputs
    params = {**params, "query": params["query"] * 50, "w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
              "b": jnp.asarray([0.1, -0.2, 0.3], jnp.float32)}
    x = rng.normal(size=(5, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(attentive.head_logits(params, jnp.asarray(x)), _aim_reference(params, x),
                               rtol=2e-5, atol=2e-5)


def _store(tmp_path, name, x, labels):
    writer = store_lib.StoreWriter(str(tmp_path / f"{name}.npy"), len(x), 1, x.shape[1], x.shape[2])
    writer.write(np.arange(len(x)), store_lib.to_bits(x)[:, None], labels)
    return writer.finish("fp")


def _separable(n, rng, length=16, width=8, classes=4):
    """Noise tokens; in each image one token at a random place carries its class's direction (x 6). The mean over
    tokens dilutes it 16 times into noise of the same size."""
    x = rng.normal(size=(n, length, width)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x[np.arange(n), rng.integers(0, length, n), y] += 6.0
    return x, y.astype(np.int32)


def test_attentive_head_separates_tokens_that_a_mean_pooled_linear_probe_cannot(tmp_path):
    rng = np.random.default_rng(1)
    splits = {s: _separable(n, rng) for s, n in (("train", 1024), ("validation", 256), ("test", 512))}
    stores = {s: _store(tmp_path, s, *xy) for s, xy in splits.items()}
    settings = attentive.AttentiveSettings(heads=4, lrs=(3e-2, 1e-3), weight_decays=(0.0,), epochs=6, batch_size=128)
    res = attentive.probe_sets(stores["train"], stores["validation"], stores["test"], settings, num_classes=4,
                               layers=[0], names=["tokens"])
    assert res["best"]["test_accuracy"] >= 0.97
    assert res["best"]["lr"] == 3e-2 and 1 <= res["best"]["epoch"] <= 6  # chosen on validation
    mean = {s: xy[0].mean(axis=1)[:, None, :] for s, xy in splits.items()}  # [n, 1 layer, width]
    linear = linear_probe.probe((mean["train"], splits["train"][1]), (mean["validation"], splits["validation"][1]),
                                (mean["test"], splits["test"][1]), linear_probe.ProbeSettings(C=(0.01, 1.0)),
                                num_classes=4)
    assert linear["best"]["test_accuracy"] < 0.8  # where the mean-pooled features fall short


def test_store_round_trip_and_an_unfinished_or_other_store_is_not_reused(tmp_path):
    x = np.random.default_rng(2).normal(size=(3, 2, 4, 5)).astype(np.float32)
    path = str(tmp_path / "tokens-step1-train.npy")
    writer = store_lib.StoreWriter(path, 3, 2, 4, 5)
    writer.write(np.array([2, 0, 1, 7]), store_lib.to_bits(np.concatenate([x[[2, 0, 1]], x[:1]])),
                 np.array([5, 3, 4, 9]))  # record 7 is past n: skipped
    assert store_lib.open_store(path, "fp") is None  # not finished
    writer.finish("fp")
    store = store_lib.open_store(path, "fp")
    assert store_lib.open_store(path, "other") is None
    np.testing.assert_array_equal(store.labels, [3, 4, 5])
    got = store_lib.to_float32(store.batch([2, 0], 1))
    np.testing.assert_array_equal(got, x[[2, 0], 1].astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_allclose(got, x[[2, 0], 1], rtol=2**-8)  # bfloat16: 8 bits of mantissa


def test_averaged_layers_are_the_mean_of_the_per_layer_token_features():
    cfg = ModelConfig(vocab_size=16, n_ctx=16, d_model=16, n_head=2, n_layer=2, remat="none", attention="dense")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    batch = {"tokens": jax.random.randint(jax.random.key(1), (3, 16), 0, 16), "label": jnp.zeros(3, jnp.int32),
             "mask": jnp.ones(3, bool), "index": jnp.arange(3)}
    layers = [0, 2]

    def run(params, batch):
        each = features.features_fn(cfg, layers, num_masks=1, seed=0, token_sets="each")(params, batch)
        avg = features.features_fn(cfg, layers, num_masks=1, seed=0, token_sets="average")(params, batch)
        pooled = features.features_fn(cfg, layers, num_masks=1, seed=0)(params, batch)
        tokens = IGPT(cfg).apply({"params": params}, batch["tokens"], features=True, feature_grid=0).layer_features
        return each, avg, pooled, tokens

    each, avg, pooled, tokens = jax.jit(run).lower(params, batch).compile(
        {"xla_backend_optimization_level": 0})(params, batch)
    tokens = np.asarray(tokens)[:, layers]  # float32 [b, layers, t, d]
    np.testing.assert_array_equal(each["token_features"], store_lib.to_bits(tokens))
    np.testing.assert_array_equal(avg["token_features"][:, 0], store_lib.to_bits(tokens.mean(axis=1)))
    # The pooled features of the token pass are the plain pass's (the linear probe sees the same features).
    np.testing.assert_allclose(each["features"], pooled["features"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(avg["nll_sum"], pooled["nll_sum"], rtol=1e-6)


@pytest.mark.parametrize("bad,match", [({"attentive_lrs": ()}, "attentive_lrs"),
                                       ({"attentive_epochs": 0}, "attentive_epochs=0"),
                                       ({"head": "mlp"}, "probe.head='mlp'")])
def test_bad_attentive_settings_are_named(bad, match):
    from igpt_jax.config import checks, defaults  # noqa: PLC0415
    from igpt_jax.errors import ConfigError  # noqa: PLC0415

    config = defaults.base_config()
    config.job = "probe"
    config.probe.update(bad)
    with pytest.raises(ConfigError, match=match):
        checks._check_probe(config)


def _attentive_job(run, workdir, **overrides):
    from tiny_runs import probe_config  # noqa: PLC0415

    from igpt_jax.jobs import probe  # noqa: PLC0415

    config = probe_config(run, head="attentive", layers="1,2", attentive_epochs=4, attentive_lrs=(3e-2,),
                          attentive_weight_decays=(0.0,), attentive_batch_size=64, C=(0.1, 10.0), C_widen=0,
                          **overrides)
    return probe.run(config, str(workdir), devices=jax.devices()[:1])


@pytest.mark.slow  # the probe job end to end (pytest -m slow -n 0 tests/test_attentive_probe.py)
def test_probe_job_reports_the_attentive_head_on_averaged_layers_beside_the_linear_probe(pretrained_digits_run,
                                                                                         tmp_path):
    results = _attentive_job(pretrained_digits_run, tmp_path, average_layers=True, baselines=False)
    last = results["checkpoints"][-1]
    att = last["attentive"]
    assert att["average_layers"] == [1, 2] and len(att["layers"]) == 1 and att["best"]["name"] == "mean of layers 1,2"
    assert results["attentive_test_accuracy"] == att["best"]["test_accuracy"] > 0.25  # digits: chance is 0.1
    assert [r["layer"] for r in last["layers"]] == [1, 2]  # the linear probe of the same pass, as before
    assert "Attentive probe" in results["table"] and "mean of layers 1,2" in results["table"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["head"] == "attentive" and (tmp_path / "tokens" / "tokens-step40-train.npy").exists()


@pytest.mark.slow  # about a minute: every layer, both baselines and low data (pytest -m slow -n 0 <this file>)
def test_probe_job_attentive_baselines_and_low_data(pretrained_digits_run, tmp_path):
    results = _attentive_job(pretrained_digits_run, tmp_path, low_data_budgets=(20,), low_data_subsets=1)
    att = results["checkpoints"][-1]["attentive"]
    assert [r["layer"] for r in att["layers"]] == [1, 2] and att["best_layer"] in (1, 2)
    assert 0.1 < results["baselines"]["raw_pixels"]["attentive"]["test_accuracy"] <= 1.0
    assert 0.1 < results["baselines"]["random_init"]["attentive"]["test_accuracy"] <= 1.0
    assert len(att["low_data"]["results"][0]["test_accuracies"]) == 1
    assert "attentive baseline, raw pixels" in results["table"]


@pytest.mark.slow  # two tracking evaluations (pytest -m slow -n 0 tests/test_attentive_probe.py)
def test_tracking_fits_the_attentive_head_when_asked(pretrained_digits_run, tmp_path):
    from etils import epath  # noqa: PLC0415
    from tiny_runs import PRETRAIN_STEPS, probe_config  # noqa: PLC0415

    from igpt_jax import sharding  # noqa: PLC0415
    from igpt_jax.models.layout import param_layout  # noqa: PLC0415
    from igpt_jax.pretrained import sources  # noqa: PLC0415
    from igpt_jax.probing import tracking  # noqa: PLC0415

    config = probe_config(pretrained_digits_run, attentive_epochs=2, attentive_lrs=(3e-2,),
                          attentive_weight_decays=(0.0,), attentive_batch_size=64, C=(1.0,), C_widen=0)
    config.track.update(every=1, train_examples=128, val_examples=64, attentive=True)
    mesh, rules = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.DEFAULT_RULES
    with sources.open_source(config, "unused") as source:
        model_cfg, palette, data_cfg = source.settings(config, PRETRAIN_STEPS)
        layout = param_layout(model_cfg, mesh, rules)
        params = source.restore_params(PRETRAIN_STEPS, layout)
    config.data = data_cfg
    tracker = tracking.Tracker(config, model_cfg, layout, mesh, rules, palette, epath.Path(tmp_path), start_step=0)
    got = tracker.evaluate(PRETRAIN_STEPS, params)
    # The same head fitted on the tracker's token stores by the library gives the same validation accuracy.
    train, val = (store_lib.open_store(str(tmp_path / "tracking_tokens" / f"tokens-{s}.npy"), "")
                  for s in ("train", "validation"))
    assert train.n == 128 and val.n == 64 and train.sets == 1  # the mean of every layer
    head = attentive.fit(train, val, 0, attentive.AttentiveSettings.from_config(config.probe), num_classes=10)
    assert got.attentive_accuracy == float(head.val_accuracy[0]) > 0.1
    assert got.scalars()["track/attentive_accuracy"] == got.attentive_accuracy
    config.track.attentive = False  # off (the default): no head, no scalar
    (tmp_path / "off").mkdir()
    off = tracking.Tracker(config, model_cfg, layout, mesh, rules, palette, epath.Path(tmp_path / "off"),
                           start_step=0).evaluate(PRETRAIN_STEPS, params)
    assert off.attentive_accuracy is None and "track/attentive_accuracy" not in off.scalars()
    assert off.accuracies == got.accuracies  # the linear probes are the same with or without the tokens


def test_the_job_warns_when_the_attentive_learning_rate_is_at_the_edge_of_its_grid(caplog):
    """Both CIFAR-10 runs of the README chose the largest rate tried: the job says so, and stays quiet inside."""
    from igpt_jax.jobs import probe  # noqa: PLC0415

    head = attentive.AttentiveSettings(lrs=(0.03, 0.01, 0.003))
    with caplog.at_level("INFO"):
        probe._warn_attentive_lr_edge({"lr": 0.01}, head)
        probe._warn_attentive_lr_edge({"lr": 0.01}, attentive.AttentiveSettings(lrs=(0.01,)))  # nothing to widen
    assert "attentive" not in caplog.text
    with caplog.at_level("INFO"):
        probe._warn_attentive_lr_edge({"lr": 0.03}, head)
    assert ("best learning rate 0.03 is at the edge of probe.attentive_lrs=0.03,0.01,0.003; widen probe.attentive_lrs"
            in caplog.text)
