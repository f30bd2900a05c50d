"""The palette of a config, cached next to its dataset: loaded if saved, else fitted on the dataset and saved.

The file is ``{data_dir}/{name}/palette_k{k}_c{channels}_r{resolution}_s{seed}.npy`` unless ``data.palette_path``
names another: every run on a dataset at one resolution and palette size shares it (and so its vocabulary). The
Palette itself (k-means fit, encode, decode) is `igpt_jax.data.palette`.
"""

from __future__ import annotations

import concurrent.futures
import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from igpt_jax.data import records, transforms
from igpt_jax.data.codes import check_codes_dataset, code_palette
from igpt_jax.data.config import resolve_data_dir
from igpt_jax.data.palette import Palette


def default_palette_path(data_cfg: ml_collections.ConfigDict) -> str:
    """{data_dir}/{name}/palette_k{k}_c{channels}_r{resolution}_s{seed}.npy."""
    data_dir = resolve_data_dir(data_cfg.data_dir)
    fname = (f'palette_k{data_cfg.n_colors}_c{data_cfg.channels}_r{data_cfg.resolution}'
             f'_s{data_cfg.palette_seed}.npy')
    return os.fspath(epath.Path(data_dir) / data_cfg.name / fname)


def sample_images(data_cfg: ml_collections.ConfigDict, num_pixels: int, seed: int) -> np.ndarray:
    """Random TFDS-train images at the input resolution (eval resize), enough for ~4x num_pixels.

    Returns:
      uint8 [n, resolution, resolution, channels].
    """
    builder = records.dataset_builder(data_cfg)
    n = builder.info.splits[data_cfg.get('train_split', 'train')].num_examples
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.val_fraction, cfg.fold_val = 0.0, True  # the whole stored train split.
    reader = records.image_records(cfg, 'train', 0, n, builder=builder)
    n_img = min(n, max(1, math.ceil(4 * num_pixels / data_cfg.resolution ** 2)), 200_000)
    picks = np.sort(np.random.default_rng(seed).choice(n, size=n_img, replace=False))
    transform = transforms.augment_for(data_cfg)

    def load(i: int) -> np.ndarray:
        return transform.eval(reader[int(i)]['image'])

    with concurrent.futures.ThreadPoolExecutor(max(1, int(data_cfg.read_threads))) as pool:
        return np.stack(list(pool.map(load, picks)))


def load_or_fit_palette(data_cfg: ml_collections.ConfigDict) -> Palette:
    """The palette of this config: loaded from palette_path, or fitted and saved there.

    Fitting uses ``palette_sample_pixels`` pixels of random images of the whole
    TFDS train split at the input resolution (independent of val_fraction and
    fold_val, so every run on a dataset shares the vocabulary), is deterministic
    given ``palette_seed``, and logs the reconstruction error. Only process 0
    writes the file (every process fits the same palette).

    Raises:
      ValueError: the palette's shape is not (n_colors, channels).
    """
    if records.tokens_kind(data_cfg) == 'codes':
        check_codes_dataset(data_cfg)
        return code_palette(int(data_cfg.n_colors))
    path = data_cfg.palette_path or default_palette_path(data_cfg)
    what = f'dataset {data_cfg.name!r}, palette {path}'
    if epath.Path(path).exists():
        palette = Palette.load(path)
        palette.check_shape(data_cfg.n_colors, data_cfg.channels, what=what)
        return palette
    pixels = sample_images(data_cfg, int(data_cfg.palette_sample_pixels), int(data_cfg.palette_seed))
    if pixels.shape[-1] != data_cfg.channels:
        raise ValueError(f'{what}: sampled images have {pixels.shape[-1]} channels, config says {data_cfg.channels}.')
    palette = Palette.fit(pixels, k=int(data_cfg.n_colors), seed=int(data_cfg.palette_seed),
                          sample_pixels=int(data_cfg.palette_sample_pixels))
    err = palette.reconstruction_error(pixels)
    err8 = palette.reconstruction_error(pixels, units='uint8')
    logging.info('Fitted %s on %d images: reconstruction MSE %.6f ([-1, 1] units), RMSE %.2f grey levels.',
                 what, len(pixels), err, math.sqrt(err8))
    if jax.process_index() == 0:
        palette.save(path)
    return palette
