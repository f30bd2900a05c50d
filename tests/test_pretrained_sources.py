"""Converted Hugging Face models through our jobs: features, NLL and tokens equal the HF model's and processor's, a
model we pretrained survives the round trip to HF and back, and bad sources are one-line errors.

Real CIFAR-10 images (the first 60 training and 40 test images of ../shared/data/cifar10.npz, imported as a small
dataset: 48 train, 12 validation, 40 test) are used; the module is skipped when the archive is absent.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import random_hf_model  # noqa: E402

from igpt_jax.config import defaults as config_defaults  # noqa: E402  # noqa: E402
from igpt_jax.data import auto_import  # noqa: E402
from igpt_jax.jobs import evaluate, pretrain, probe, sample  # noqa: E402
from igpt_jax.pretrained import convert  # noqa: E402
from igpt_jax.pretrained import sources as pretrained  # noqa: E402
from igpt_jax.probing import features as features_lib  # noqa: E402

CIFAR = auto_import.SHARED_DATA / "cifar10.npz"
N_TRAIN, N_TEST = 60, 40
# 32x32 and 32 colours: OpenAI's models have 512, but the port's code paths do not depend on the number, and the
# processor's palette is applied through our 2**24-entry colour lookup table (a 512-colour one costs ~30 s of CPU here).
N_COLORS = 32
HF_KW = dict(n_layer=2, n_embd=32, n_head=2, n_positions=1024, vocab_size=N_COLORS + 1)

pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} is absent")


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    """(data_dir, npz) of a dataset 'cifar10_subset': real CIFAR-10 images, imported by the first job."""
    root = tmp_path_factory.mktemp("cifar_subset")
    with np.load(CIFAR) as z:
        arrays = {"x_train": z["x_train"][:N_TRAIN], "y_train": z["y_train"][:N_TRAIN],
                  "x_test": z["x_test"][:N_TEST], "y_test": z["y_test"][:N_TEST]}
    np.savez(root / "cifar10_subset.npz", **arrays)
    return str(root / "tfds"), str(root / "cifar10_subset.npz")


def job_config(cifar_subset, source: str, job: str) -> ml_collections.ConfigDict:
    """A job on the subset that says nothing the source says: architecture and token settings are None."""
    data_dir, npz = cifar_subset
    config = config_defaults.base_config()
    config.job = job
    config.data = config_defaults.default_data_config("cifar10_subset")
    config.data.update(data_dir=data_dir, import_source=npz, val_fraction=0.2)
    for name in pretrained.DATA_FIELDS:
        config.data[name] = None
    for name in pretrained.ARCHITECTURE_FIELDS:
        config.model[name] = None
    config.model.attention = "dense"
    config.mesh.shape = (1, 1, 1)
    config.checkpoint.source_workdir = source
    config.probe.update(C=(1.0,), C_widen=0, solver="lbfgs", baselines=False, plots=False, batch_size=50)
    config.evaluate.batch_size = 50
    return config


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random HF model and a processor with random clusters, saved with save_pretrained into one folder."""
    folder = tmp_path_factory.mktemp("hf")
    model = random_hf_model(0, **HF_KW)
    clusters = np.random.default_rng(0).uniform(-1, 1, (N_COLORS, 3)).astype(np.float32)
    processor = transformers.ImageGPTImageProcessor(clusters=clusters, size={"height": 32, "width": 32})
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder), model, processor


@pytest.fixture(scope="module")
def converted(hf_folder, tmp_path_factory):
    """DIR written by the convert command from the HF folder."""
    out = str(tmp_path_factory.mktemp("converted") / "igpt")
    subprocess.run([sys.executable, "-m", "igpt_jax.pretrained.convert", f"--hf={hf_folder[0]}", f"--out={out}"], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    return out


def run_probe_recording_features(config, workdir, monkeypatch):
    """The probe job's results and the features it extracted, by split."""
    seen = {}
    extract = features_lib.FeatureExtractor.extract

    def recording(self, params, split, **kwargs):
        seen[split] = extract(self, params, split, **kwargs)
        return seen[split]

    monkeypatch.setattr(features_lib.FeatureExtractor, "extract", recording)
    results = probe.run(config, workdir, devices=jax.devices()[:1])
    monkeypatch.undo()
    return results, seen


def stored_test_images(cifar_subset, index: np.ndarray) -> np.ndarray:
    """The stored test images (uint8 [n, 32, 32, 3]) with these record indices, as the pipeline reads them."""
    source = tfds.data_source("cifar10_subset", split="test", data_dir=cifar_subset[0],
                              decoders={"image": tfds.decode.SkipDecoding()})
    return np.stack([np.asarray(Image.open(io.BytesIO(source[int(i)]["image"])).convert("RGB")) for i in index])


def hf_input_ids(processor, images: np.ndarray) -> np.ndarray:
    return np.asarray(processor(images=list(images), return_tensors="np")["input_ids"]).astype(np.int32)


def test_probe_features_and_tokens_equal_the_hf_models(cifar_subset, hf_folder, converted, tmp_path, monkeypatch):
    _, model, processor = hf_folder
    config = job_config(cifar_subset, converted, "probe")
    results, seen = run_probe_recording_features(config, str(tmp_path / "probe"), monkeypatch)
    assert results["source"] == {"path": converted, "kind": "converted"}
    assert results["examples"] == {"train": 48, "validation": 12, "test": N_TEST}
    test = seen["test"]
    # The processor's input_ids are our tokens, image for image.
    ids = hf_input_ids(processor, stored_test_images(cifar_subset, test.index))
    np.testing.assert_array_equal(test.tokens, ids)
    # Per-layer features: the sequence mean of ln_1 of each block's input (the HF hidden_states), and of ln_f.
    cfg = convert.hf_config_to_model_config(model.config)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(convert.hf_input_ids(ids, cfg)), output_hidden_states=True)
        hidden = out.hidden_states  # L + 1: the input of every block, then ln_f's output
        want = [model.transformer.h[l].ln_1(hidden[l]).mean(1).numpy() for l in range(cfg.n_layer)]
        want.append(hidden[cfg.n_layer].mean(1).numpy())
    got = test.features[0]  # [n, L + 1, d]
    assert got.shape == (N_TEST, cfg.n_layer + 1, cfg.d_model)
    for layer, expected in enumerate(want):
        np.testing.assert_allclose(got[:, layer], expected, atol=1e-4, rtol=0)
    assert float(np.std(got)) > 0.1  # features that vary


def test_evaluate_nll_equals_the_hf_loss_and_sample_runs(cifar_subset, hf_folder, converted, tmp_path):
    _, model, processor = hf_folder
    config = job_config(cifar_subset, converted, "evaluate")
    result = evaluate.run(config, str(tmp_path / "eval"), devices=jax.devices()[:1])
    assert result["images"] == N_TEST and result["source_kind"] == "converted" and result["step"] is None
    ids = hf_input_ids(processor, stored_test_images(cifar_subset, np.arange(N_TEST)))
    cfg = convert.hf_config_to_model_config(model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(convert.hf_input_ids(ids, cfg))).logits
        hf_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                          torch.from_numpy(ids).long().reshape(-1)))
    assert result["nll"] == pytest.approx(hf_loss, rel=1e-4)

    config = job_config(cifar_subset, converted, "sample")
    config.sample.update(num_images=2, samples_per_image=1, given_rows=24, batch_size=2)
    out = sample.run(config, str(tmp_path / "sample"), devices=jax.devices()[:1])
    assert out["samples"].shape == (2, 1, 1024)
    np.testing.assert_array_equal(out["samples"][:, 0, :24 * 32], ids[:2, :24 * 32])  # the given rows are kept
    assert (tmp_path / "sample" / "completions.png").is_file()


def test_our_pretrained_model_survives_hf_and_back(cifar_subset, tmp_path, monkeypatch):
    data_dir, npz = cifar_subset
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config("cifar10_subset")
    config.data.update(data_dir=data_dir, import_source=npz, val_fraction=0.2, resolution=8, n_colors=16,
                       palette_sample_pixels=20_000)
    config.model = config_defaults.model_config(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2,
                                                remat="none", attention="dense")
    config.train.update(batch_size=16, num_steps=4, warmup_steps=1, log_every=2, eval_every=0)
    config.checkpoint.every_steps = 4
    config.mesh.shape = (1, 1, 1)
    run = str(tmp_path / "run")
    pretrain.run(config, run, devices=jax.devices()[:1])

    convert.export_to_hf(run, str(tmp_path / "hf"))
    assert transformers.ImageGPTImageProcessor.from_pretrained(str(tmp_path / "hf")).size["height"] == 8
    convert.export_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))

    results, features = {}, {}
    for name, source in (("run", run), ("back", str(tmp_path / "back"))):
        results[name], features[name] = run_probe_recording_features(
            job_config(cifar_subset, source, "probe"), str(tmp_path / f"probe_{name}"), monkeypatch)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(features["run"][split].features, features["back"][split].features)
        np.testing.assert_array_equal(features["run"][split].tokens, features["back"][split].tokens)
    assert results["run"]["checkpoints"][-1]["layers"] == results["back"]["checkpoints"][-1]["layers"]
    assert results["run"]["test_accuracy"] == results["back"]["test_accuracy"]


# ------------------------------------------------------------------------------------------------ bad sources


def test_bad_sources_are_one_line_errors(cifar_subset, hf_folder, converted, tmp_path):
    def load(source, **data):
        config = job_config(cifar_subset, source, "probe")
        config.data.update(data)
        return pretrained.load_on_mesh(config, "unused", devices=jax.devices()[:1])

    def one_line(err):
        assert "\n" not in str(err.value), str(err.value)

    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*nothing/checkpoints and no converted model in "
                                                r".*nothing: expected a pretraining run") as err:
        load(str(tmp_path / "nothing"))
    one_line(err)
    with pytest.raises(FileNotFoundError, match=r"looks like a Hugging Face folder: convert it first") as err:
        load(hf_folder[0])
    one_line(err)

    model_only = tmp_path / "model_only"
    hf_folder[1].save_pretrained(str(model_only))
    with pytest.raises(ValueError, match=rf"{model_only} has no image processor \(preprocessor_config.json\)") as err:
        convert.export_from_hf(str(model_only), str(tmp_path / "x"))
    one_line(err)

    with pytest.raises(ValueError, match=rf"data.resolution=64 gives 4096 tokens per image, more than the context "
                                         rf"n_ctx=1024 of converted model {converted}") as err:
        load(converted, resolution=64)
    one_line(err)

    bad = tmp_path / "bad_palette"
    bad.mkdir()
    for name in (pretrained.CONFIG_FILE, pretrained.PARAMS_DIR):
        os.symlink(Path(converted) / name, bad / name)
    (bad / pretrained.PALETTE_FILE).write_text(json.dumps({"centres": np.zeros((16, 3)).tolist()}))
    with pytest.raises(ValueError, match=rf"the palette in {bad}/palette.json has 16 colours but the model's "
                                         rf"vocabulary is {N_COLORS}") as err:
        load(str(bad))
    one_line(err)

    config = job_config(cifar_subset, converted, "probe")
    config.model.n_layer = 3
    with pytest.raises(ValueError, match=r"model\.n_layer=3 but the source has 2") as err:
        probe.run(config, str(tmp_path / "p"), devices=jax.devices()[:1])
    one_line(err)
