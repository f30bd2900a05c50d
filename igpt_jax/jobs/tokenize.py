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
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from igpt_jax.data import auto_import, iterators, records
from igpt_jax.data import codes as codes_lib
from igpt_jax.data import config as data_config
from igpt_jax.pretrained import vqvae as pretrained_vqvae


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Encodes every split of config.vqvae.data into the dataset config.data names; returns its metadata.

    Args:
      config: the full config (``config.vqvae``, ``config.data`` for the dataset written, ``config.checkpoint``).
      workdir: the job's workdir; also the VQ-VAE run when ``checkpoint.source_workdir`` is empty.

    Returns:
      {'metadata', 'data_dir', 'path', 'splits': examples per split}, or {'metadata', 'data_dir', 'reused': True}
      when this VQ-VAE already wrote the dataset.

    Raises:
      ValueError: more than one process, settings that disagree with the VQ-VAE, or a dataset of that name written
        by another VQ-VAE.
    """
    if jax.process_count() > 1:
        raise ValueError(f"the tokenize job runs in one process (got {jax.process_count()}); run it on one host")
    grid = check_config(config)
    trained = pretrained_vqvae.load(config.checkpoint.source_workdir or workdir, int(config.checkpoint.step), config)
    source_cfg = pretrained_vqvae.source_data_config(config)
    source_builder = tfds.builder(source_cfg.name, data_dir=auto_import.ensure_dataset(source_cfg))
    data_dir = data_config.resolve_data_dir(config.data.data_dir)
    metadata = {"vocab_size": trained.cfg.vocab_size, "grid": grid, "source_dataset": source_cfg.name,
                "source_resolution": int(source_cfg.resolution), "vqvae_checkpoint": trained.directory,
                "vqvae_step": trained.step, "downsample": trained.cfg.downsample}
    if _already_written(config.data.name, data_dir, metadata):
        print(f"Codes dataset {config.data.name!r} in {data_dir} is already written by this VQ-VAE.", flush=True)
        return {"metadata": metadata, "data_dir": data_dir, "reused": True}

    encode = pretrained_vqvae.reconstruct_fn(trained.cfg)  # one jitted function for every split
    batch_size = int(config.tokenize.batch_size)
    splits = {name: _split_examples(encode, trained, source_cfg, name, batch_size)
              for name in source_builder.info.splits.keys()}
    path = codes_lib.write_codes_dataset(
        name=config.data.name, data_dir=data_dir, grid=grid,
        label_names=tuple(source_builder.info.features["label"].names), splits=splits, metadata=metadata,
        description=_description(trained, source_cfg, grid), homepage=source_builder.info.homepage or "",
        citation=source_builder.info.citation or "")

    written = tfds.builder(config.data.name, data_dir=data_dir).info.splits
    sizes = {name: info.num_examples for name, info in written.items()}
    message = (f"Tokenized {source_cfg.name} -> {config.data.name} ({grid}x{grid} codes, vocabulary "
               f"{trained.cfg.vocab_size}) {sizes} in {path}")
    logging.info("%s", message)
    print(message, flush=True)
    return {"metadata": metadata, "data_dir": data_dir, "path": path, "splits": sizes}


def check_config(config: ml_collections.ConfigDict) -> int:
    """The written dataset's settings must match the VQ-VAE's; returns the grid side.

    Raises:
      ValueError: one line naming the two values that disagree.
    """
    vq_cfg = pretrained_vqvae.model_config(config)
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


def _already_written(name: str, data_dir: str, metadata: dict[str, Any]) -> bool:
    """Whether dataset `name` in `data_dir` holds these codes already.

    Raises:
      ValueError: the dataset was written by another VQ-VAE checkpoint.
    """
    existing = epath.Path(data_dir) / name / "1.0.0" / "metadata.json"
    if not existing.exists():
        return False
    old = json.loads(existing.read_text())
    if old != metadata:
        raise ValueError(f"dataset {name!r} in {data_dir} was written from {old.get('vqvae_checkpoint')} step "
                         f"{old.get('vqvae_step')}, not {metadata['vqvae_checkpoint']} step {metadata['vqvae_step']}: "
                         "delete it or change data.name")
    return True


def _split_config(source_cfg: ml_collections.ConfigDict, tfds_split: str) -> ml_collections.ConfigDict:
    """A raw-pixel data config whose 'train' split is the whole TFDS split `tfds_split`, in stored order."""
    cfg = ml_collections.ConfigDict(source_cfg.to_dict())
    cfg.train_split, cfg.val_fraction, cfg.fold_val = tfds_split, 0.0, True
    return cfg


def _split_examples(encode: Callable, trained: pretrained_vqvae.TrainedVQVAE, source_cfg: ml_collections.ConfigDict,
                    tfds_split: str, batch_size: int) -> Callable[[], Iterator[tuple[int, np.ndarray, int]]]:
    """A generator function yielding (record index, codes [g, g], label) of every image of `tfds_split`.

    Args:
      encode: `pretrained_vqvae.reconstruct_fn` of the VQ-VAE.
    """
    def examples() -> Iterator[tuple[int, np.ndarray, int]]:
        it = iterators.make_iterator(_split_config(source_cfg, tfds_split), "train", batch_size=batch_size,
                                         train=False, seed=0, shard_index=0, shard_count=1)
        for batch in it:
            codes, _ = jax.device_get(encode(trained.params, trained.embeddings, batch["image"]))
            for j in np.flatnonzero(batch["mask"]):
                yield int(batch["index"][j]), codes[j], int(batch["label"][j])

    return examples


def _description(trained: pretrained_vqvae.TrainedVQVAE, source_cfg: ml_collections.ConfigDict, grid: int) -> str:
    return (f"{source_cfg.name} at {source_cfg.resolution}x{source_cfg.resolution} encoded by a VQ-VAE "
            f"(paper appendix A.2) into {grid}x{grid} grids of codes from a vocabulary of {trained.cfg.vocab_size}; "
            f"VQ-VAE {trained.directory} step {trained.step}. Records keep the source's order; 'id' is the source "
            "record index.")
