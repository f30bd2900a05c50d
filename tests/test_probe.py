"""The linear-probe job and its pieces, on the embedded digits and a tiny model pretrained once per session."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tiny_runs import PRETRAIN_STEPS, downstream_config, probe_config

from igpt_jax import sharding
from igpt_jax.data import iterators, palette_cache, records
from igpt_jax.jobs import probe
from igpt_jax.models.igpt import IGPT, ModelConfig
from igpt_jax.models.layout import param_layout, random_params
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import fitting, linear_probe

tiny_config = downstream_config


@pytest.fixture(scope="session")
def run(pretrained_digits_run):
    return pretrained_digits_run


def one_device_mesh():
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


# ----------------------------------------------------------------------------------------------- features


def test_probe_features_equal_the_models_forward_pass(run):
    config = probe_config(run)
    mesh, rules = one_device_mesh(), sharding.DEFAULT_RULES
    loaded = pretrained.load(config, "unused", mesh, rules)
    assert loaded.step == PRETRAIN_STEPS and loaded.model_cfg.d_model == 32
    extractor = features_lib.FeatureExtractor(loaded.model_cfg, loaded.layout, mesh, rules, config.data,
                                              loaded.palette, [0, 1, 2], batch_size=64)
    got = extractor.extract(loaded.params, "validation")
    # Independently: the whole split in one batch, straight through the model.
    batch = next(iterators.make_iterator(config.data, "validation", batch_size=200, train=False,
                                         palette=loaded.palette))
    keep = batch["mask"]
    forward = jax.jit(lambda p, t: IGPT(loaded.model_cfg).apply({"params": p}, t, features=True, logits=False))
    out = forward(jax.device_get(loaded.params), batch["tokens"][keep])
    assert got.features.shape == (1, 150, 3, 32)
    np.testing.assert_array_equal(got.labels, batch["label"][keep])
    np.testing.assert_array_equal(got.tokens, batch["tokens"][keep])
    np.testing.assert_allclose(got.features[0], np.asarray(out.layer_features), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.features[0, :, 2], np.asarray(out.final_features), atol=1e-5, rtol=1e-5)
    # The same on a (data 2, fsdp 2, tensor 2) mesh: parameters restored into their shards, batches split.
    mesh8 = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    sharded = pretrained.load(config, "unused", mesh8, rules)
    assert sharded.params["blocks"]["mlp"]["fc"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    got8 = features_lib.FeatureExtractor(sharded.model_cfg, sharded.layout, mesh8, rules, config.data,
                                         sharded.palette, [0, 1, 2], batch_size=64).extract(sharded.params,
                                                                                            "validation")
    np.testing.assert_allclose(got8.features, got.features, atol=1e-5, rtol=1e-5)
    assert got8.loss == pytest.approx(got.loss, rel=1e-5)


def test_quadrant_pooled_features_are_the_models_and_need_a_divisible_square_grid(run):
    config = probe_config(run)
    mesh, rules = one_device_mesh(), sharding.DEFAULT_RULES
    loaded = pretrained.load(config, "unused", mesh, rules)
    got = features_lib.FeatureExtractor(loaded.model_cfg, loaded.layout, mesh, rules, config.data, loaded.palette,
                                        [1, 2], batch_size=64, pooling="quadrants").extract(loaded.params, "test")
    batch = next(iterators.make_iterator(config.data, "test", batch_size=400, train=False,
                                         palette=loaded.palette))
    out = IGPT(loaded.model_cfg).apply({"params": jax.device_get(loaded.params)}, batch["tokens"][batch["mask"]],
                                       features=True, logits=False, feature_grid=2)
    assert got.features.shape == (1, got.n, 2, 4 * 32)
    np.testing.assert_allclose(got.features[0], np.asarray(out.layer_features[:, 1:]), atol=1e-5, rtol=1e-5)
    assert features_lib.pooling_grid("mean", 63) == 1
    with pytest.raises(ValueError, match=r"^probe.pooling='quadrants' needs a square token grid whose side 2 "
                                         r"divides; the model has 49 tokens per image$"):
        features_lib.pooling_grid("quadrants", 49)
    with pytest.raises(ValueError, match=r"^probe.pooling='max': expected one of \['mean', 'quadrants'\]$"):
        features_lib.pooling_grid("max")


def test_bert_features_are_the_models_under_masks_that_depend_on_the_example_only(run):
    data_dir, _ = run
    config = tiny_config(data_dir)
    cfg = ModelConfig(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense",
                      objective="bert")
    mesh, rules = one_device_mesh(), sharding.DEFAULT_RULES
    layout = param_layout(cfg, mesh, rules)
    params = random_params(cfg, layout, mesh, rules, jax.random.key(0))
    palette = palette_cache.load_or_fit_palette(config.data)
    got = features_lib.FeatureExtractor(cfg, layout, mesh, rules, config.data, palette, [1, 2],
                                        batch_size=30).extract(params, "validation", num_masks=2)
    assert got.features.shape == (2, 150, 2, 32)
    assert not np.allclose(got.features[0], got.features[1])  # independent masks

    @jax.jit
    def alone(p, tokens, index, m):  # one example, in a batch of its own, under mask m
        mask = features_lib.bert_masks(features_lib.mask_key(0, m), index, 64, cfg.bert_mask_rate)
        return IGPT(cfg).apply({"params": p}, tokens, bert_mask=mask, features=True, logits=False).layer_features

    host_params = jax.device_get(params)
    for i in (0, 77, 149):
        for m in (0, 1):
            out = alone(host_params, got.tokens[i:i + 1], got.index[i:i + 1], m)
            np.testing.assert_allclose(got.features[m, i], np.asarray(out)[0, 1:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- probe maths


CENTRES = 1.5 * np.random.default_rng(123).normal(size=(3, 8))


def synthetic_layers(n, informative, seed=0):
    """Features [n, 3 layers, 8] of 3 classes: layer `informative` carries the label, the others are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 3, 8)).astype(np.float32)
    x[:, informative] += CENTRES[y]
    return x, y


def test_the_probe_picks_the_layer_best_on_validation():
    settings = linear_probe.ProbeSettings(C=(0.01, 1.0))
    x_tr, y_tr = synthetic_layers(300, informative=1, seed=0)
    x_va, y_va = synthetic_layers(200, informative=1, seed=1)
    x_te, y_te = synthetic_layers(200, informative=1, seed=2)
    # Layer 2 is perfect on train (label leaked) but carries nothing on validation/test.
    x_tr[:, 2] += 10 * np.eye(3, 8)[y_tr]
    res = linear_probe.probe((x_tr, y_tr), (x_va, y_va), (x_te, y_te), settings, num_classes=3, layers=[0, 4, 9])
    val = [r["val_accuracy"] for r in res["layers"]]
    assert res["best_layer"] == 4 == res["layers"][int(np.argmax(val))]["layer"]
    assert res["best"]["test_accuracy"] > 0.8 and val[0] < 0.6 and val[2] < 0.6
    # The selection function on its own, on hand-made validation accuracies.
    fits = [linear_probe.LayerFit(l, None, acc, {}) for l, acc in zip([0, 1, 2, 3], [0.3, 0.7, 0.9, 0.9])]
    assert linear_probe.best_position(fits) == 2
    # Ties in accuracy go to the lower validation loss (then the earliest).
    fits = [linear_probe.LayerFit(l, None, acc, {}, loss)
            for l, acc, loss in zip([0, 1, 2, 3, 4], [0.9, 0.7, 0.9, 0.9, 0.9], [0.5, 0.1, 0.4, 0.3, 0.3])]
    assert linear_probe.best_position(fits) == 3


def test_sgd_probe_trains_all_layers_at_once_and_finds_the_informative_one():
    settings = linear_probe.ProbeSettings(solver="sgd", sgd_lrs=(1.0, 0.1), sgd_steps=200, sgd_batch_size=64)
    x_tr, y_tr = synthetic_layers(400, informative=0, seed=3)
    x_va, y_va = synthetic_layers(200, informative=0, seed=4)
    res = linear_probe.probe((x_tr, y_tr), (x_va, y_va), (x_va, y_va), settings, num_classes=3)
    assert res["best_layer"] == 0 and res["best"]["test_accuracy"] > 0.85 and res["solver"] == "sgd"
    assert set(res["layers"][0]["val_accuracy_by_lr"]) == {"1.0", "0.1"}


def test_modal_prediction_returns_the_mode_and_breaks_ties_at_random():
    preds = np.array([[0, 1, 2, 3], [0, 1, 1, 3], [1, 2, 1, 0]])
    np.testing.assert_array_equal(linear_probe.modal_prediction(preds, 4, np.random.default_rng(0)), [0, 1, 1, 3])
    tie = np.array([[0] * 2000, [1] * 2000])  # every column tied between 0 and 1
    out = linear_probe.modal_prediction(tie, 3, np.random.default_rng(0))
    assert set(np.unique(out)) == {0, 1} and 0.45 < out.mean() < 0.55
    np.testing.assert_array_equal(linear_probe.modal_prediction(preds[:1], 4, np.random.default_rng(0)), preds[0])


def test_low_data_subsets_are_balanced_and_reported_as_mean_and_std():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    idx = linear_probe.balanced_subset(labels, 10, 4, rng)
    counts = np.bincount(labels[idx], minlength=4)
    assert len(idx) == 10 == counts.sum() and counts.max() - counts.min() <= 1 and len(set(idx)) == 10
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        linear_probe.balanced_subset(labels, 3, 4, rng)
    x_tr, y_tr = synthetic_layers(300, informative=0, seed=5)
    x_va, y_va = synthetic_layers(100, informative=0, seed=6)
    res = linear_probe.low_data((x_tr[:, 0], y_tr), (x_va[:, 0], y_va), (x_va[:, 0], y_va),
                                linear_probe.ProbeSettings(C=(1.0,)), num_classes=3, budgets=[6, 60], subsets=3)
    assert [r["budget"] for r in res] == [6, 60] and len(res[0]["test_accuracies"]) == 3
    assert res[0]["mean_accuracy"] == pytest.approx(np.mean(res[0]["test_accuracies"]))
    assert res[0]["std_accuracy"] == pytest.approx(np.std(res[0]["test_accuracies"]))


# ----------------------------------------------------------------------------------------------- the job


def test_probe_job_reports_every_layer_the_best_layer_and_the_baselines(probe_results, capsys):
    config, workdir, res = probe_results
    written = json.loads((Path(workdir) / "results.json").read_text())
    assert written["steps"] == [20, 40] and written["step"] == 40
    assert written["config"]["probe"]["C"] == [0.01, 1.0, 100.0] and written["config"]["model"]["d_model"] == 32
    assert written["pretrain_config"]["train"]["num_steps"] == PRETRAIN_STEPS
    last = written["checkpoints"][-1]
    assert [r["layer"] for r in last["layers"]] == [0, 1, 2]
    val = [r["val_accuracy"] for r in last["layers"]]
    assert last["best_layer"] == int(np.argmax(val)) == written["best_layer"]
    assert written["test_accuracy"] == last["best"]["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert last["concat"]["features"] == 64 and len(last["concat"]["layers"]) == 2
    assert len(last["low_data"]["results"][0]["test_accuracies"]) == 2
    assert all(c["val_loss"] > 0 for c in written["checkpoints"])
    assert written["checkpoints"][0]["val_loss"] > written["checkpoints"][1]["val_loss"]  # training lowers the loss
    base = written["baselines"]
    assert base["raw_pixels"]["features"] == 64 and base["raw_pixels"]["test_accuracy"] > 0.8
    assert [r["layer"] for r in base["random_init"]["layers"]] == [0, 1, 2]
    for name in ("probe_layers.png", "probe_vs_val_loss.png"):
        with Image.open(Path(workdir) / name) as img:
            assert img.format == "PNG" and img.size == (900, 600)
    assert "best layer (on validation)" in res["table"] and "raw pixels" in res["table"]


def test_raw_pixel_baseline_equals_a_direct_scikit_learn_fit(run, probe_results):
    config, _, res = probe_results
    with pretrained.open_source(config, "unused") as source:
        palette = source.palette(res["step"])
    data = {}
    for split in records.SPLITS:
        batch = next(iterators.make_iterator(config.data, split, batch_size=2000, train=False, palette=palette))
        keep = batch["mask"]
        data[split] = (palette.centres[batch["tokens"][keep]].reshape(keep.sum(), -1), batch["label"][keep])

    def standardize(fit_on, *xs):
        mean, std = fit_on.astype(np.float64).mean(0), fit_on.astype(np.float64).std(0)
        std = np.where(std > 1e-8 * max(1.0, np.abs(mean).max()), std, 1.0)
        mean, std = mean.astype(np.float32), std.astype(np.float32)
        return [(x.astype(np.float32) - mean) / std for x in xs]

    (xtr, ytr), (xva, yva), (xte, yte) = (data[s] for s in records.SPLITS)
    with threadpool_limits(1):  # threaded BLAS on a 1500 x 64 problem is only slower
        str_, sva = standardize(xtr, xtr, xva)
        val_acc = {C: LogisticRegression(C=C, max_iter=1000).fit(str_, ytr).score(sva, yva)
                   for C in (0.01, 1.0, 100.0)}
        best_C = max(val_acc, key=lambda c: (val_acc[c], -c))
        xall, yall = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
        sall, ste = standardize(xall, xall, xte)
        test_acc = LogisticRegression(C=best_C, max_iter=1000).fit(sall, yall).score(ste, yte)
    got = res["baselines"]["raw_pixels"]
    assert got["C"] == best_C
    assert got["val_accuracy"] == pytest.approx(val_acc[best_C], abs=1e-9)
    assert got["test_accuracy"] == pytest.approx(test_acc, abs=1e-9)


# ----------------------------------------------------------------------------------------------- resume


class Stopped(Exception):
    """Stands for SIGTERM/SIGKILL arriving while the first probe is fitted."""


def _comparable(workdir) -> dict:
    res = json.loads((Path(workdir) / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in ("seconds", "reused", "reused_seconds")}


def test_a_stopped_probe_job_resumes_from_its_saved_features_with_identical_results(run, tmp_path, monkeypatch):
    # scikit-learn's solver on a fixed grid: what is resumed (saved features, per-problem results) is the solver's
    # input and output, whichever solver it is; the JAX solver's compiles would triple the test's time.
    config = probe_config(run, C=(0.1, 1.0), concat_layers=2, low_data_budgets=(20,), low_data_subsets=2,
                          solver="lbfgs", C_widen=0)
    devices = jax.devices()[:1]
    probe.run(config, str(tmp_path / "uninterrupted"), devices=devices)

    stopped = tmp_path / "stopped"
    real_probe_splits = fitting.probe_splits

    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(fitting, "probe_splits", stop)
    with pytest.raises(Stopped):
        probe.run(config, str(stopped), devices=devices)
    saved = sorted(p.name for p in (stopped / "progress").iterdir())
    assert saved == [f"features-step{PRETRAIN_STEPS}-{s}.npz" for s in ("test", "train", "validation")]

    extracted = []
    real_extract = features_lib.FeatureExtractor.extract

    def counting_extract(self, params, split, **kwargs):
        extracted.append(split)
        return real_extract(self, params, split, **kwargs)

    monkeypatch.setattr(fitting, "probe_splits", real_probe_splits)
    monkeypatch.setattr(features_lib.FeatureExtractor, "extract", counting_extract)
    resumed = probe.run(config, str(stopped), devices=devices)
    assert extracted == list(records.SPLITS)  # the random-weights baseline's splits only
    assert resumed["reused"] == [f"features-step{PRETRAIN_STEPS}-{s}" for s in records.SPLITS]
    assert _comparable(stopped) == _comparable(tmp_path / "uninterrupted")
    # The job's time counts the reused features' time, as it was when they were extracted.
    saved_seconds = [float(np.load(stopped / "progress" / name)["seconds"]) for name in saved]
    assert min(saved_seconds) > 0 and resumed["reused_seconds"] == pytest.approx(sum(saved_seconds))
    assert resumed["seconds"] > resumed["reused_seconds"]

    # Other solver settings: the features are reused, every probe is fitted again.
    extracted.clear()
    config.probe.C = (0.1, 1.0, 10.0)
    again = probe.run(config, str(stopped), devices=devices)
    assert extracted == [] and not any(name.startswith("result-") for name in again["reused"])
    assert again["checkpoints"][0]["layers"][0]["val_accuracy_by_C"].keys() >= {"0.1", "1.0", "10.0"}


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_with_what_and_where(run, tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty/checkpoints"):
        probe.run(_with(probe_config(run), source=str(empty)), str(tmp_path / "out"), devices=jax.devices()[:1])
    config = probe_config(run)
    config.model.d_model = 48
    config.model.n_head = 2
    with pytest.raises(ValueError, match=r"model\.d_model=48 but the source has 32") as err:
        probe.run(config, str(tmp_path / "out"), devices=jax.devices()[:1])
    assert str(Path(run[1]) / "checkpoints" / str(PRETRAIN_STEPS)) in str(err.value)
    config = probe_config(run)
    config.checkpoint.step = 7
    with pytest.raises(FileNotFoundError, match=r"checkpoint step 7 is not in .*available steps: \[20, 40\]"):
        probe.run(config, str(tmp_path / "out"), devices=jax.devices()[:1])
    config = probe_config(run)
    config.probe.layers = "0,5"
    with pytest.raises(ValueError, match=r"layer 5 is outside \[0, 2\]"):
        probe.run(config, str(tmp_path / "out"), devices=jax.devices()[:1])


def _with(config, *, source):
    config.checkpoint.source_workdir = source
    return config
