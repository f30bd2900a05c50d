"""Helpers (not a test module) for tests that need a tiny config or run of a job on the embedded digits.

The session fixture that pretrains once (`pretrained_digits_run`) is in conftest.py; test modules import these
functions, never each other. `get_config` makes this file a config file for the command line too
(``--config=tests/tiny_runs.py:JOB,DATA_DIR[,SOURCE_WORKDIR]``).
"""

import json
from pathlib import Path

import jax
import ml_collections

from igpt_jax import sharding
from igpt_jax.config import defaults as config_defaults
from igpt_jax.data import palette_cache
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.training import optim
from igpt_jax.training import step as train

PRETRAIN_STEPS = 40  # the shared pretraining run: checkpoints at steps 20 and 40


def pretrain_config(data_dir: str, **train_overrides) -> ml_collections.ConfigDict:
    """A 2-layer, width-32 model on the 8x8 digits: 6 steps of 16, a checkpoint every 2 steps, one device."""
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config("digits")
    config.data.data_dir = data_dir
    config.model = config_defaults.model_config(
        vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense"
    )
    config.train.batch_size = 16
    config.train.num_steps = 6
    config.train.warmup_steps = 2
    config.train.lr = 3e-3
    config.train.log_every = 1
    config.train.eval_every = 0
    config.checkpoint.every_steps = 2
    config.mesh.shape = (1, 1, 1)
    config.train.update(train_overrides)
    return config


def downstream_config(data_dir: str) -> ml_collections.ConfigDict:
    """The shared run's config (PRETRAIN_STEPS steps of 32, checkpoints at the half and the end), probe batch 64."""
    config = pretrain_config(data_dir, batch_size=32, num_steps=PRETRAIN_STEPS, warmup_steps=4, log_every=20)
    config.checkpoint.every_steps = PRETRAIN_STEPS // 2
    config.probe.batch_size = 64
    return config


def probe_config(run, **probe_overrides) -> ml_collections.ConfigDict:
    """The probe job's config on the shared run (`run` = (data_dir, workdir)), with `config.probe` overrides."""
    data_dir, workdir = run
    config = downstream_config(data_dir)
    config.job = "probe"
    config.checkpoint.source_workdir = workdir
    config.probe.update(probe_overrides)
    return config


FINETUNE_STEPS, FINETUNE_EVAL_EVERY = 40, 20


def finetune_config(run, **overrides) -> ml_collections.ConfigDict:
    """The fine-tuning job's config on the shared run: FINETUNE_STEPS steps of L_CLF, `config.finetune` overrides."""
    data_dir, workdir = run
    config = downstream_config(data_dir)
    config.job = "finetune"
    config.checkpoint.source_workdir = workdir
    config.checkpoint.every_steps = 1000
    config.finetune.num_steps = FINETUNE_STEPS
    config.finetune.eval_every = FINETUNE_EVAL_EVERY
    config.finetune.lr = 1e-2
    # L_CLF alone: with L_GEN + L_CLF (the default) a 40-step run barely moves the head of this tiny model.
    config.finetune.objective = "clf"
    config.finetune.batch_size = 32
    config.finetune.eval_batch_size = 160
    config.finetune.log_every = 10
    config.finetune.update(overrides)
    return config


VQVAE_VOCAB = 32


def vqvae_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """A VQ-VAE on the 8x8 digits: one block (4x4 codes), 32 codes, batch 32, 200 steps; `config.vqvae` overrides."""
    config = config_defaults.base_config()
    config.job = "vqvae"
    config.vqvae.data.data_dir = data_dir
    config.vqvae.vocab_size = VQVAE_VOCAB
    config.vqvae.batch_size = 32
    config.vqvae.num_steps = 200
    config.vqvae.lr = 3e-4
    config.vqvae.log_every = 1
    config.vqvae.eval_batch_size = 128
    config.vqvae.variance_images = 200
    config.checkpoint.every_steps = 100
    config.mesh.shape = (1, 1, 1)
    config.vqvae.update(overrides)
    return config


TRAINING_JOBS = ("pretrain", "finetune", "vqvae")  # the jobs that run on igpt_jax.training.loop
SHORT_STEPS = 20


def short_training_config(job: str, data_dir: str, source_workdir: str = "") -> ml_collections.ConfigDict:
    """SHORT_STEPS steps of a job that trains, a checkpoint after every step (the last two kept); fine-tuning reads
    `source_workdir` (a pretraining run) and evaluates every 5 steps."""
    if job == "pretrain":
        config = pretrain_config(data_dir, num_steps=SHORT_STEPS)
    elif job == "finetune":
        config = finetune_config((data_dir, source_workdir), num_steps=SHORT_STEPS, eval_every=5)
    elif job == "vqvae":
        config = vqvae_config(data_dir, num_steps=SHORT_STEPS, grid_images=0)
    else:
        raise ValueError(f"{job!r} is not one of {TRAINING_JOBS}")
    config.checkpoint.update(every_steps=1, max_to_keep=2)
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    """The command line's config: ``JOB,DATA_DIR[,SOURCE_WORKDIR]`` -> `short_training_config`."""
    return short_training_config(*arg.split(","))


def write_checkpoint(tmp_path_factory, data_dir: str, step: int = 5):
    """A checkpoint as pretraining writes it (state, config, palette) of a random model whose logits are not flat.

    Returns:
      (the run's config, its workdir, the parameters, the palette).
    """
    config = pretrain_config(data_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    model_cfg = ModelConfig.from_config(config.model)
    tx = optim.make_optimizer(config.train, optim.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=1))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    layout = train.state_layout(model_cfg, tx, mesh, sharding.DEFAULT_RULES)
    state = train.create_state(model_cfg, tx, layout, mesh, sharding.DEFAULT_RULES, jax.random.key(0))
    wtet = 0.3 * jax.random.normal(jax.random.key(1), state.params["wtet"].shape)
    state = state.replace(params={**state.params, "wtet": wtet})
    palette = palette_cache.load_or_fit_palette(config.data)
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, config=config, palette=palette.centres, force=True)
    ckpt.close()
    return config, workdir, jax.device_get(state.params), palette


WALL_CLOCK = ("tokens_per_sec", "tflops_per_device", "mfu")  # the rates a flush adds: timing, not computation


def metric_records(workdir) -> list[dict]:
    """A run's metrics.jsonl records without the wall-clock rates (what two runs of the same steps share)."""
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]
