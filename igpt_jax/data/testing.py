"""Small synthetic datasets for tests and benchmarks (no downloads, a few KB)."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from igpt_jax.data.config import default_data_config


def synthetic_images(n: int, size: tuple[int, int], channels: int, classes: int,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images (gradients plus a blob) and labels.

    Returns:
      (uint8 [n, H, W, C], int64 [n] labels in [0, classes)).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
    images = np.empty((n, h, w, channels), np.uint8)
    for i in range(n):
        a, b, c0 = rng.uniform(-1, 1, (3, channels))
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = 0.5 + 0.25 * (a * yy[..., None] + b * xx[..., None]) + 0.25 * c0 * blob
        images[i] = np.clip(np.rint(255 * img), 0, 255).astype(np.uint8)
    labels = rng.integers(0, classes, n)
    return images, labels


def write_npz(path: str | os.PathLike, *, n_train: int, n_test: int, size: tuple[int, int],
              channels: int, classes: int = 10, seed: int = 0, squeeze_gray: bool = False) -> dict[str, np.ndarray]:
    """Writes an archive laid out like shared/data/*.npz; returns its arrays."""
    x_train, y_train = synthetic_images(n_train, size, channels, classes, seed)
    x_test, y_test = synthetic_images(n_test, size, channels, classes, seed + 1)
    if squeeze_gray and channels == 1:
        x_train, x_test = x_train[..., 0], x_test[..., 0]
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(path, **arrays)
    return arrays


def small_config(name: str, data_dir: str | os.PathLike, *, resolution: int, channels: int,
                 n_colors: int = 8, augment: str = 'none', val_fraction: float = 0.0,
                 sample_pixels: int = 20_000) -> ml_collections.ConfigDict:
    """A data config for a small local dataset (no auto-import, no worker processes)."""
    cfg = default_data_config(name)
    cfg.data_dir = os.fspath(data_dir)
    cfg.resolution = resolution
    cfg.channels = channels
    cfg.n_colors = n_colors
    cfg.augment = augment
    cfg.val_fraction = val_fraction
    cfg.palette_sample_pixels = sample_pixels
    cfg.auto_import = False
    cfg.read_threads = 2
    cfg.prefetch_buffer_size = 4
    return cfg
