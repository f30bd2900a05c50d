"""The VQ-VAE job (``config.job='vqvae'``): trains the paper's VQ-VAE (appendix A.2) on raw RGB images.

Input: ``config.vqvae.data`` (a data config read with ``tokens='raw'``: images in [-1, 1], the augmentation of its
``augment``), sharded over the mesh's batch axes like pretraining; the parameters and the codebook are replicated
(the model has under 200K parameters). Each step: Adam (``vqvae.lr``, paper 1e-4) on reconstruction / data variance
+ 0.02 x commitment, then the EMA codebook update and the revival of dead codes (igpt_jax/models/vqvae.py).

Runs on the training skeleton, like pretraining (`igpt_jax.training.loop.TrainingRun`): Orbax checkpoints with the
data position (resumes exactly; an unreadable newest step is moved aside and the previous one restored; a resume
that would change the VQ-VAE's architecture, images or schedule is refused or recorded as igpt_jax/config/changes.py
says), a finished run says so, SIGTERM or SIGINT saves and exits naming the signal, progress lines, TensorBoard and
metrics.jsonl (loss, recon_loss, mse, commit_loss, perplexity, codes_used, revived), ``segments.json``. Nothing is
evaluated while it trains. At the end: reconstruction MSE (and RMSE in grey levels) and codebook usage on the test
split -> ``vqvae_results.json``, and ``reconstructions.png`` (test images above their reconstructions); then
``FINISHED``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.data import iterators, multihost, palette_cache
from igpt_jax.models import vqvae as vq
from igpt_jax.pretrained.vqvae import (
    abstract_state,
    check_checkpoint_codebook,
    create_state,
    evaluate_split,
    make_optimizer,
    model_config,
    source_data_config,
)
from igpt_jax.reports import images
from igpt_jax.training.loop import TrainingRun


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], key: jax.Array, *, cfg: vq.VQVAEConfig,
               tx: optax.GradientTransformation) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One Adam step on the autoencoder, then the EMA codebook update and revival (a pure function)."""
    model = vq.VQVAE(cfg)
    codebook = state["codebook"]

    def loss_fn(params):
        return vq.loss_and_aux(params, model, codebook, batch["image"], data_variance=state["data_variance"],
                               commitment=cfg.commitment)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    z = jax.lax.stop_gradient(aux["z"]).reshape(-1, cfg.width)  # [N, D]
    codes = aux["codes"].reshape(-1)
    codebook = vq.ema_update(codebook, z, codes, decay=cfg.decay, epsilon=cfg.epsilon)
    codebook, revived = vq.revive_dead_codes(codebook, z, jax.random.fold_in(key, state["step"]),
                                             dead_fraction=cfg.dead_fraction, noise=cfg.revive_noise)
    metrics = {"loss": loss, "recon_loss": aux["recon_loss"], "mse": aux["mse"], "commit_loss": aux["commit_loss"],
               "perplexity": vq.perplexity(codes, cfg.vocab_size),
               "codes_used": jnp.sum(jnp.bincount(codes, length=cfg.vocab_size) > 0), "revived": revived}
    new_state = {**state, "params": params, "opt_state": opt_state, "codebook": codebook, "step": state["step"] + 1}
    return new_state, metrics


def estimate_data_variance(data_cfg: ml_collections.ConfigDict, num_images: int, seed: int) -> float:
    """Variance of the pixels (in [-1, 1]) of `num_images` random training images (deterministic given seed)."""
    images = palette_cache.sample_images(data_cfg, max(1, num_images // 4) * data_cfg.resolution**2, seed)
    return float(np.var(images.astype(np.float64) / 127.5 - 1.0))


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, stop_at_step: int | None = None
        ) -> dict[str, Any]:
    """Trains (or resumes) the VQ-VAE in `workdir`; returns the metrics and the test reconstruction error."""
    t_start = time.time()
    vq_cfg, data_cfg = model_config(config), source_data_config(config)
    res = int(data_cfg.resolution)
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    global_batch = int(config.vqvae.batch_size)
    sharding.check_batch_divides(global_batch, mesh, rules, what="vqvae.batch_size")
    rows = multihost.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    train_iter = iterators.make_iterator(data_cfg, "train", batch_size=rows.size, train=True, seed=config.seed,
                                             rows=rows)
    tx = make_optimizer(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    base_rng = jax.random.key(config.seed)

    def create() -> dict[str, Any]:
        variance = float(config.vqvae.data_variance) or estimate_data_variance(
            data_cfg, int(config.vqvae.variance_images), config.seed)
        return jax.device_put(create_state(vq_cfg, tx, res, jax.random.fold_in(base_rng, 1), variance), replicated)

    with TrainingRun(workdir, config.checkpoint, num_steps=int(config.vqvae.num_steps),
                     log_every=int(config.vqvae.log_every), stop_at_step=stop_at_step, t_start=t_start) as run:
        if run.already_finished():
            return run.finished_result()
        state = run.restore_or_create(  # the checkpoint's codebook must be the config's, before the resume rules
            abstract_state(vq_cfg, tx, res, mesh), create, data_iterator=train_iter, config=config,
            tokens_per_step=global_batch * res * res,
            check=lambda step, stored: check_checkpoint_codebook(run.ckpt, step, vq_cfg, stored=stored))
        run.result["params"] = describe(vq_cfg, state, res, global_batch)
        step_fn = jax.jit(lambda s, b, k: train_step(s, b, k, cfg=vq_cfg, tx=tx),
                          in_shardings=(replicated, sharding.batch_sharding(mesh, rules), None),
                          out_shardings=(replicated, None), donate_argnums=0)
        step_rng = jax.random.fold_in(base_rng, 2)
        with jax.set_mesh(mesh):
            state = run.train(state, train_step=lambda s, b: step_fn(s, b, step_rng), next_batch=lambda: (
                multihost.make_global_batch({"image": next(train_iter)["image"]}, mesh,
                                                sharding.batch_axes(rules), rows)))
        if run.stopped:
            return run.result
        tested = test_reconstruction(config, vq_cfg, state, data_cfg, run.workpath)  # before FINISHED
        return {**run.finish(), **tested}


def describe(vq_cfg: vq.VQVAEConfig, state: dict[str, Any], res: int, global_batch: int) -> int:
    """Logs and prints the model's size, code grid, codebook and data variance; returns the parameter count."""
    n_params = vq.count_params(state["params"])
    grid = vq_cfg.grid(res)
    message = (f"VQ-VAE: {n_params:,} parameters outside the codebook ({vq_cfg.downsample} block(s), {res}x{res} -> "
               f"{grid}x{grid} codes); codebook {vq_cfg.vocab_size} x {vq_cfg.width}; data variance "
               f"{float(jax.device_get(state['data_variance'])):.4f}; expected usage per code "
               f"{vq.expected_usage(global_batch * grid * grid, vq_cfg.vocab_size):.1f} per batch")
    logging.info("%s", message)
    print(message, flush=True)
    return n_params


def test_reconstruction(config, vq_cfg: vq.VQVAEConfig, state, data_cfg, workpath: epath.Path) -> dict[str, Any]:
    """Test-split reconstruction error and codebook usage -> vqvae_results.json; reconstructions.png."""
    params, embeddings = jax.device_get(state["params"]), jax.device_get(state["codebook"].embeddings)
    n_grid = int(config.vqvae.grid_images)
    test = evaluate_split(vq_cfg, params, embeddings, data_cfg, "test", batch_size=int(config.vqvae.eval_batch_size),
                          grid_images=n_grid)
    summary = {k: v for k, v in test.items() if k not in ("originals", "reconstructions")}
    summary["params_outside_codebook"] = vq.count_params(params)
    if jax.process_index() == 0:
        (workpath / workdir_files.VQVAE_RESULTS).write_text(json.dumps(summary, indent=2))
        if n_grid:
            panels = np.stack([test["originals"], test["reconstructions"]])  # [2, n, R, R, C]
            images.save_png(workpath / workdir_files.VQVAE_GRID,
                              images.image_grid(panels, scale=images.default_scale(data_cfg.resolution)))
    message = (f"VQ-VAE test reconstruction: MSE {summary['mse']:.5f} ([-1, 1] units), RMSE "
               f"{summary['rmse_grey_levels']:.2f} grey levels; {summary['codes_used']} of {vq_cfg.vocab_size} codes "
               f"used (perplexity {summary['perplexity']:.1f}); {workpath / workdir_files.VQVAE_RESULTS}")
    logging.info("%s", message)
    print(message, flush=True)
    return {"test": summary}


