"""The tokenize job (``config.job='tokenize'``): a trained VQ-VAE encodes every split of its image dataset into a
new TFDS dataset of code grids, which the other jobs then read like pixels.

    config.checkpoint.source_workdir (the VQ-VAE run; in `config.then` chains, the vqvae job before it)
    config.vqvae.data: the image dataset (every TFDS split, in stored order, at its resolution, no augmentation)
    config.data: the dataset written: name, data_dir; tokens='codes', n_colors = vqvae.vocab_size,
                 resolution = the code grid side (checked before any work)

The result (igpt_jax/data/codes.py) is array_record with features codes [g, g], label and id, the source's class
names, and metadata.json naming the vocabulary, grid, source and VQ-VAE run. A dataset already written by the same
VQ-VAE checkpoint is kept; one written by another is an error (delete it or choose another data.name).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from igpt_jax import sharding
from igpt_jax.data import auto_import, iterators, records
from igpt_jax.data import codes as codes_lib
from igpt_jax.data import config as data_config
from igpt_jax.pretrained import vqvae as vqvae_run
from igpt_jax.training import checkpoint as ckpt_lib


def check_config(config: ml_collections.ConfigDict) -> int:
    """The written dataset's settings must match the VQ-VAE's; returns the grid side.

    Raises:
      ValueError: one line naming the two values that disagree.
    """
    vq_cfg = vqvae_run.model_config(config)
    grid = vq_cfg.grid(int(config.vqvae.data.resolution))
    data = config.data
    if records.tokens_kind(data) != "codes":
        raise ValueError(f"the tokenize job writes codes: set data.tokens='codes' (got {data.tokens!r})")
    if data.name == config.vqvae.data.name:
        raise ValueError(f"data.name={data.name!r} is the image dataset vqvae.data.name: the codes need a new name")
    if int(data.n_colors) != vq_cfg.vocab_size:
        raise ValueError(f"data.n_colors={data.n_colors} differs from vqvae.vocab_size={vq_cfg.vocab_size}: the "
                         "codebook size is the vocabulary of the codes")
    if int(data.resolution) != grid:
        raise ValueError(f"data.resolution={data.resolution} differs from the code grid {grid} "
                         f"(vqvae.data.resolution={config.vqvae.data.resolution} / 2**{vq_cfg.downsample})")
    return grid


def load_vqvae(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any, int, str]:
    """(params, codebook embeddings, step, directory) of the VQ-VAE in checkpoint.source_workdir (or `workdir`).

    Raises:
      ValueError: the checkpoint's codebook or architecture is not the config's.
    """
    source = config.checkpoint.source_workdir or workdir
    ckpt = ckpt_lib.Checkpointer(source, create=False)
    try:
        step = ckpt_lib.resolve_step(ckpt, int(config.checkpoint.step))
        vq_cfg = vqvae_run.model_config(config)
        vqvae_run.check_checkpoint_codebook(ckpt, step, vq_cfg)
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        abstract = vqvae_run.abstract_state(vq_cfg, vqvae_run.make_optimizer(config),
                                            int(config.vqvae.data.resolution), mesh)
        state = ckpt.restore(step, abstract)
        embeddings = state["codebook"].embeddings
        if embeddings.shape[0] != vq_cfg.vocab_size:
            raise ValueError(f"VQ-VAE checkpoint {ckpt.directory}/{step} has a codebook of {embeddings.shape[0]} "
                             f"codes but vqvae.vocab_size={vq_cfg.vocab_size}")
        return jax.device_get(state["params"]), jax.device_get(embeddings), step, str(ckpt.directory)
    finally:
        ckpt.close()


def _split_config(source_cfg: ml_collections.ConfigDict, tfds_split: str) -> ml_collections.ConfigDict:
    """A raw-pixel data config whose 'train' split is the whole TFDS split `tfds_split`, in stored order."""
    cfg = ml_collections.ConfigDict(source_cfg.to_dict())
    cfg.train_split, cfg.val_fraction, cfg.fold_val = tfds_split, 0.0, True
    return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Encodes every split of config.vqvae.data into the dataset config.data names; returns its metadata."""
    if jax.process_count() > 1:
        raise ValueError(f"the tokenize job runs in one process (got {jax.process_count()}); run it on one host")
    grid = check_config(config)
    vq_cfg = vqvae_run.model_config(config)
    params, embeddings, step, ckpt_dir = load_vqvae(config, workdir)
    source_cfg = vqvae_run.source_data_config(config)
    source_builder = tfds.builder(source_cfg.name, data_dir=auto_import.ensure_dataset(source_cfg))
    label_names = tuple(source_builder.info.features["label"].names)
    data_dir = data_config.resolve_data_dir(config.data.data_dir)
    metadata = {"vocab_size": vq_cfg.vocab_size, "grid": grid, "source_dataset": source_cfg.name,
                "source_resolution": int(source_cfg.resolution), "vqvae_checkpoint": ckpt_dir, "vqvae_step": step,
                "downsample": vq_cfg.downsample}
    existing = epath.Path(data_dir) / config.data.name / "1.0.0" / "metadata.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if old != metadata:
            raise ValueError(f"dataset {config.data.name!r} in {data_dir} was written from {old.get('vqvae_checkpoint')}"
                             f" step {old.get('vqvae_step')}, not {ckpt_dir} step {step}: delete it or change data.name")
        print(f"Codes dataset {config.data.name!r} in {data_dir} is already written by this VQ-VAE.", flush=True)
        return {"metadata": metadata, "data_dir": data_dir, "reused": True}

    fn = vqvae_run.reconstruct_fn(vq_cfg)
    batch_size = int(config.tokenize.batch_size)

    def encode_split(tfds_split: str):
        def gen():
            it = iterators.make_iterator(_split_config(source_cfg, tfds_split), "train", batch_size=batch_size,
                                         train=False, seed=0, shard_index=0, shard_count=1)
            for batch in it:
                codes, _ = jax.device_get(fn(params, embeddings, batch["image"]))
                for j in np.flatnonzero(batch["mask"]):
                    yield int(batch["index"][j]), codes[j], int(batch["label"][j])
        return gen

    splits = {name: encode_split(name) for name in source_builder.info.splits.keys()}
    description = (f"{source_cfg.name} at {source_cfg.resolution}x{source_cfg.resolution} encoded by a VQ-VAE "
                   f"(paper appendix A.2) into {grid}x{grid} grids of codes from a vocabulary of {vq_cfg.vocab_size}; "
                   f"VQ-VAE {ckpt_dir} step {step}. Records keep the source's order; 'id' is the source record index.")
    path = codes_lib.write_codes_dataset(
        name=config.data.name, data_dir=data_dir, grid=grid, label_names=label_names, splits=splits,
        metadata=metadata, description=description, homepage=source_builder.info.homepage or "",
        citation=source_builder.info.citation or "")
    written = tfds.builder(config.data.name, data_dir=data_dir).info.splits
    sizes = {name: info.num_examples for name, info in written.items()}
    message = (f"Tokenized {source_cfg.name} -> {config.data.name} ({grid}x{grid} codes, vocabulary "
               f"{vq_cfg.vocab_size}) {sizes} in {path}")
    logging.info("%s", message)
    print(message, flush=True)
    return {"metadata": metadata, "data_dir": data_dir, "path": path, "splits": sizes}
