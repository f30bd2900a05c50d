"""The VQ-VAE (paper A.2), its training job, the tokenize job and pretraining on codes, on the embedded digits."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_runs import VQVAE_VOCAB, vqvae_config

from igpt_jax import workdir as workdir_files
from igpt_jax.config import defaults as config_defaults
from igpt_jax.data import iterators
from igpt_jax.jobs import pretrain, probe, sample, tokenize
from igpt_jax.jobs import vqvae as vqvae_job
from igpt_jax.models import vqvae as vq
from igpt_jax.pretrained import vqvae as vqvae_run
from igpt_jax.reports import images

VOCAB = VQVAE_VOCAB
ONE = jax.devices()[:1]  # the conftest session has 8 fake CPU devices


@pytest.fixture(scope="session")
def data_dir(digits_data_dir):
    """The session's digits data_dir (tests/conftest.py)."""
    return digits_data_dir


def codes_config(config: ml_collections.ConfigDict, data_dir: str, name: str = "digits_vq") -> None:
    """config.data: the digits' codes; a tiny model on them."""
    config.data = config_defaults.default_data_config(name)
    config.data.update(data_dir=data_dir, tokens="codes", n_colors=VOCAB, resolution=4, channels=1, augment="none",
                       auto_import=False)
    config.model = config_defaults.model_config(vocab_size=VOCAB, n_ctx=16, d_model=32, n_head=2, n_layer=2,
                                                remat="none", attention="dense")
    config.train.update(batch_size=16, num_steps=20, warmup_steps=2, log_every=5, eval_every=0)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A VQ-VAE trained for 200 steps (about 10 s), and its result."""
    workdir = str(tmp_path_factory.mktemp("vqvae"))
    config = vqvae_config(data_dir)
    return workdir, config, vqvae_job.run(config, workdir, devices=ONE)


# ------------------------------------------------------------------ codebook functions
def test_vqvae_ema_update_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    k, d, n, decay, eps = 5, 3, 12, 0.9, 1e-3
    emb = rng.normal(size=(k, d)).astype(np.float32)
    size = rng.uniform(0.5, 3.0, k).astype(np.float32)
    sums = rng.normal(size=(k, d)).astype(np.float32)
    z = rng.normal(size=(n, d)).astype(np.float32)
    codes = np.array([0, 1, 1, 3, 3, 3, 0, 4, 4, 1, 0, 3], np.int32)  # code 2 unused
    out = vq.ema_update(vq.CodebookState(jnp.asarray(emb), jnp.asarray(size), jnp.asarray(sums)), jnp.asarray(z),
                        jnp.asarray(codes), decay=decay, epsilon=eps)

    counts = np.array([np.sum(codes == i) for i in range(k)], np.float64)
    batch_sums = np.stack([z[codes == i].sum(0) if np.any(codes == i) else np.zeros(d) for i in range(k)])
    want_size = decay * size + (1 - decay) * counts
    want_sums = decay * sums + (1 - decay) * batch_sums
    total = want_size.sum()
    smoothed = (want_size + eps) / (total + k * eps) * total
    np.testing.assert_allclose(out.cluster_size, want_size, rtol=1e-6)
    np.testing.assert_allclose(out.embed_sum, want_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.embeddings, want_sums / smoothed[:, None], rtol=1e-5, atol=1e-6)
    # The nearest-code search agrees with a brute-force argmin.
    want_codes = np.argmin(((z[:, None, :] - emb[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(vq.nearest_codes(jnp.asarray(z), jnp.asarray(emb)), want_codes)


def test_vqvae_dead_code_is_revived_near_an_encoder_output_and_live_codes_stay():
    d, n = 2, 40  # 4 codes: expected usage 10 per code; dead below 1
    emb = jnp.asarray([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-3.0, 2.0]])
    size = jnp.asarray([12.0, 9.0, 0.5, 2.0])
    state = vq.CodebookState(emb, size, emb * size[:, None])
    z = jax.random.normal(jax.random.key(1), (n, d)) + 10.0
    key = jax.random.key(7)
    out, revived = vq.revive_dead_codes(state, z, key, dead_fraction=0.1, noise=0.01)
    assert int(revived) == 1
    np.testing.assert_array_equal(np.asarray(out.embeddings)[[0, 1, 3]], np.asarray(emb)[[0, 1, 3]])
    nearest = float(jnp.min(jnp.linalg.norm(z - out.embeddings[2], axis=1)))
    assert 0 < nearest < 0.1  # an encoder output plus 1 % noise, far from where it was
    assert float(out.cluster_size[2]) == pytest.approx(1.0)  # back at the threshold
    again, _ = vq.revive_dead_codes(state, z, key, dead_fraction=0.1, noise=0.01)
    np.testing.assert_array_equal(again.embeddings, out.embeddings)  # a function of the key


def test_vqvae_straight_through_gradients_reach_the_encoder():
    cfg = vq.VQVAEConfig(vocab_size=8, channels=1)
    params = vq.init_params(cfg, jax.random.key(0), 8)
    images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
    z = vq.VQVAE(cfg).apply({"params": params}, images, method=vq.VQVAE.encode)
    codebook = vq.CodebookState(z.reshape(-1, 64)[:8] + 0.1, jnp.ones(8), jnp.zeros((8, 64)))

    def loss(p):  # no commitment term: only the reconstruction, through the quantiser, reaches the encoder
        return vq.loss_and_aux(p, vq.VQVAE(cfg), codebook, images, data_variance=1.0, commitment=0.0)[0]

    grads = jax.grad(loss)(params)
    encoder_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["encoder"]))
    decoder_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["decoder"]))
    assert encoder_norm > 1e-8 and decoder_norm > 1e-8


def test_vqvae_parameter_counts_of_the_paper_layouts():
    one_block = vq.count_params(vq.init_params(vq.VQVAEConfig(downsample=1), jax.random.key(0), 32))
    two_blocks = vq.count_params(vq.init_params(vq.VQVAEConfig(downsample=2), jax.random.key(0), 32))
    # 4x4 convs 3->64 (3,136) and 64->3 (3,075), residual stacks 64->32->64 (20,576 each), 4x4 64->64 (65,600).
    assert one_block == 3_136 + 3_075 + 2 * 20_576
    assert two_blocks == one_block + 2 * (65_600 + 20_576)


# ------------------------------------------------------------------ the training job
def test_vqvae_trained_reconstructs_better_than_the_mean_image(trained, data_dir):
    workdir, config, result = trained
    test = result["test"]
    # The mean image's MSE on the test split (the best constant reconstruction).
    it = iterators.make_iterator(vqvae_run.source_data_config(config), "test", batch_size=128, train=False,
                                 shard_index=0, shard_count=1)
    images = np.concatenate([b["image"][b["mask"]] for b in it]).astype(np.float64)
    mean_mse = float(np.mean((images - images.mean(0)) ** 2))
    assert test["mse"] < 0.6 * mean_mse, (test["mse"], mean_mse)
    assert test["codes_used"] >= 8
    assert os.path.exists(os.path.join(workdir, workdir_files.VQVAE_GRID))
    saved = json.load(open(os.path.join(workdir, workdir_files.VQVAE_RESULTS)))
    assert saved["mse"] == pytest.approx(test["mse"])
    history = result["history"]
    assert history[0]["revived"] > VOCAB // 2  # the first step fills the codebook from encoder outputs
    assert {"recon_loss", "perplexity", "codes_used", "revived"} <= set(history[-1])


def test_vqvae_resumed_training_is_bit_exact_with_an_uninterrupted_one_also_past_an_unreadable_checkpoint(
        data_dir, tmp_path, caplog):
    config = vqvae_config(data_dir, num_steps=6, grid_images=0)
    config.checkpoint.every_steps = 2
    whole = vqvae_job.run(config, str(tmp_path / "whole"), devices=ONE)
    split = tmp_path / "split"
    first = vqvae_job.run(config, str(split), devices=ONE, stop_at_step=4)  # checkpoints at steps 2 and 4
    assert first["preempted"] and first["step"] == 4
    # Step 4 is cut short (a kill while writing): moved aside with a one-line report, training goes on from step 2.
    state_files = [p for p in (split / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(state_files, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)
    second = vqvae_job.run(config, str(split), devices=ONE)
    (report,) = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert report.startswith("checkpoint step 4 is unreadable (state: ") and report.endswith("resuming from step 2")
    assert [p.name.split("-")[0] for p in (split / "checkpoints_unreadable").iterdir()] == ["4"]
    assert second["resumed"] and second["start_step"] == 2
    keys = ("loss", "mse", "perplexity", "revived")
    assert [[h[k] for k in keys] for h in whole["history"]] == \
        [[h[k] for k in keys] for h in first["history"][:2] + second["history"]]
    assert whole["test"]["mse"] == second["test"]["mse"]


def test_vqvae_resume_refuses_a_changed_schedule_without_the_flag_and_records_it_with_the_flag(data_dir, tmp_path):
    config = vqvae_config(data_dir, num_steps=4, grid_images=0)
    config.checkpoint.every_steps = 2
    vqvae_job.run(config, str(tmp_path), devices=ONE, stop_at_step=2)
    faster = vqvae_config(data_dir, num_steps=4, grid_images=0, lr=1e-3)
    faster.checkpoint.every_steps = 2
    faster.model.n_layer = 3  # the transformer's settings are free in a VQ-VAE run: only later jobs read them
    with pytest.raises(ValueError, match=r"would change vqvae.lr from 0.0003 to 0.001: set "
                       r"--config.checkpoint.allow_changes=True"):
        vqvae_job.run(faster, str(tmp_path), devices=ONE)
    assert json.loads((tmp_path / "config.json").read_text())["vqvae"]["lr"] == 3e-4  # nothing changed yet
    other_images = vqvae_config(data_dir, num_steps=4, grid_images=0)
    other_images.vqvae.data.augment = "cifar"
    with pytest.raises(ValueError, match=r"with vqvae.data.augment='cifar': the checkpoint was trained with "
                       r"vqvae.data.augment='none'"):
        vqvae_job.run(other_images, str(tmp_path), devices=ONE)
    faster.checkpoint.allow_changes = True
    resumed = vqvae_job.run(faster, str(tmp_path), devices=ONE)
    assert resumed["start_step"] == 2 and resumed["finished"]
    changes = {c["field"]: (c["step"], c["old"], c["new"]) for c in map(json.loads, (
        tmp_path / "config_history.jsonl").read_text().splitlines())}
    assert changes["vqvae.lr"] == (2, 3e-4, 1e-3) and changes["model.n_layer"] == (2, 2, 3)


def test_vqvae_on_an_8_device_mesh_trains_like_one_device(data_dir, tmp_path):
    config = vqvae_config(data_dir, num_steps=4, grid_images=0)
    one = vqvae_job.run(config, str(tmp_path / "one"), devices=ONE)
    config.mesh.shape = (-1, 1, 1)  # the batch of 32 split over 8 devices; parameters and codebook replicated
    eight = vqvae_job.run(config, str(tmp_path / "eight"), devices=jax.devices()[:8])
    for a, b in zip(one["history"], eight["history"]):
        assert a["revived"] == b["revived"] and a["codes_used"] == b["codes_used"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# ------------------------------------------------------------------ tokenize -> pretrain -> probe
def test_vqvae_tokenize_pretrain_probe_end_to_end(trained, data_dir, tmp_path):
    vq_workdir, vq_config, _ = trained
    config = vqvae_config(data_dir)
    codes_config(config, data_dir)
    config.checkpoint.source_workdir = vq_workdir
    out = tokenize.run(config, str(tmp_path / "tokenize"))
    assert out["splits"] == {"train": 1500, "test": 297}
    assert out["metadata"]["vocab_size"] == VOCAB and out["metadata"]["grid"] == 4

    # The stored codes are the VQ-VAE's codes of the source images, in the source's order.
    trained_vq = vqvae_run.load(vq_workdir, -1, config)
    params, emb = trained_vq.params, trained_vq.embeddings
    src = iterators.make_iterator(vqvae_run.source_data_config(vq_config), "test", batch_size=8, train=False,
                                      shard_index=0, shard_count=1)
    first = next(src)
    want, recon = vqvae_run.reconstruct_fn(vqvae_run.model_config(config))(params, emb, first["image"])
    got = next(iterators.make_iterator(config.data, "test", batch_size=8, train=False, shard_index=0,
                                       shard_count=1))
    np.testing.assert_array_equal(got["tokens"], np.asarray(want).reshape(8, -1))
    np.testing.assert_array_equal(got["label"], first["label"])
    again = tokenize.run(config, str(tmp_path / "tokenize"))
    assert again["reused"]

    result = pretrain.run(config, str(tmp_path / "pretrain"), devices=ONE)
    assert result["finished"] and result["history"][-1]["loss"] < result["history"][0]["loss"]
    config.probe.update(layers="1", baselines=False, C=(1.0,), C_widen=0, solver="lbfgs", max_iter=200, batch_size=128)
    config.checkpoint.source_workdir = str(tmp_path / "pretrain")
    config.job = "probe"
    probed = probe.run(config, str(tmp_path / "probe"), devices=ONE)
    # The sample job shows generated codes through the VQ-VAE's decoder: 8x8 images, not 4x4 grids of codes.
    config.job = "sample"
    config.sample.update(mode="unconditional", num_samples=4, batch_size=4)
    sampled = sample.run(config, str(tmp_path / "sample"), devices=ONE)
    scale = images.default_scale(8)
    assert sampled["grid"].shape == (2 * (8 * scale + 2) + 2, 2 * (8 * scale + 2) + 2, 1)
    decoder = vqvae_run.CodeDecoder.from_codes_dataset(config.data)
    np.testing.assert_array_equal(decoder.decode(got["tokens"].reshape(8, 4, 4)), vqvae_run.to_uint8(recon))
    assert probed["dataset"] == "digits_vq" and probed["examples"]["test"] == 297
    assert probed["test_accuracy"] > 0.3  # ten classes: chance is 0.1


# ------------------------------------------------------------------ bad input
def test_vqvae_image_size_the_encoder_cannot_divide_is_a_one_line_error(data_dir, tmp_path):
    config = vqvae_config(data_dir, downsample=2)
    config.vqvae.data.resolution = 10
    with pytest.raises(ValueError, match=r"data.resolution=10 is not divisible .* factor 4 \(vqvae.downsample=2\)"):
        vqvae_job.run(config, str(tmp_path / "w"), devices=ONE)


def test_vqvae_codes_with_a_model_of_another_vocabulary_is_a_one_line_error(trained, data_dir, tmp_path):
    vq_workdir, _, _ = trained
    config = vqvae_config(data_dir)
    codes_config(config, data_dir, name="digits_vq_bad")
    config.checkpoint.source_workdir = vq_workdir
    tokenize.run(config, str(tmp_path / "tokenize"))
    config.data.n_colors = 64
    config.model.vocab_size = 64
    with pytest.raises(ValueError, match=r"codes of a 32-code VQ-VAE but data.n_colors=64"):
        pretrain.run(config, str(tmp_path / "pretrain"), devices=ONE)


def test_vqvae_checkpoint_whose_codebook_disagrees_with_the_config_is_a_one_line_error(trained, data_dir, tmp_path):
    vq_workdir, _, _ = trained
    config = vqvae_config(data_dir, vocab_size=64)
    codes_config(config, data_dir, name="digits_vq_other")
    config.data.n_colors = 64
    config.checkpoint.source_workdir = vq_workdir
    with pytest.raises(ValueError, match=r"vqvae.vocab_size=32 but the config says vqvae.vocab_size=64"):
        tokenize.run(config, str(tmp_path / "tokenize"))
    config = vqvae_config(data_dir)
    codes_config(config, data_dir, name="digits_vq_other")
    config.data.n_colors = 16
    with pytest.raises(ValueError, match=r"data.n_colors=16 differs from vqvae.vocab_size=32"):
        tokenize.check_config(config)


# ------------------------------------------------------------------ the paper's ImageNet setting on a pod
@pytest.mark.slow
def test_vqvae_imagenet_pretraining_on_codes_compiles_and_fits_its_pod(tmp_path):
    pytest.importorskip("libtpu", reason="the compile job needs libtpu to describe TPU slices")
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from igpt_jax.jobs import compile as compile_job  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "configs" / "vqvae_imagenet.py"
    spec = importlib.util.spec_from_file_location("vqvae_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("pod=v4-1024")
    config.job, config.then = "compile", ()
    report = compile_job.run(config, str(tmp_path))
    assert report["fits"] is True
    assert report["model"]["vocab_size"] == 4096 and report["seq_len"] == 48 * 48
    assert report["mesh"] == {"data": 1, "fsdp": 128, "context": 1, "tensor": 4}
