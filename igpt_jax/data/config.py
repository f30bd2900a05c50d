"""Default data config (``config.data``) that the model and job configs start from, and the settings that follow
the dataset.

A config may leave the dataset-dependent fields (resolution, channels, n_colors, augment, val_fraction) at AUTO
(``default_data_config(name, auto=True)``); `derive_data_settings` then fills them from ``data.name`` and the stored
data once the command line has been applied, so that ``--config.data.name=my_photos`` alone switches datasets.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from igpt_jax.data import builders

# Per-dataset presets: (resolution, channels, n_colors, augment, val_fraction).
# Paper 3.1: 4% of ImageNet train and 10% of CIFAR train held out for validation.
# Grayscale palettes may not have more colours than grey levels: digits has 17
# levels (0..16 scaled to uint8), Fashion-MNIST 256.
PRESETS: dict[str, dict[str, object]] = {
    'digits': dict(resolution=8, channels=1, n_colors=16, augment='none', val_fraction=0.1),
    'cifar10': dict(resolution=32, channels=3, n_colors=512, augment='cifar', val_fraction=0.1),
    'fashion_mnist': dict(resolution=28, channels=1, n_colors=64, augment='none', val_fraction=0.1),
    'imagenet2012': dict(resolution=32, channels=3, n_colors=512, augment='imagenet', val_fraction=0.04),
}

# Any other (imported) dataset: RGB at 32x32 with 512 colours, no augmentation.
_OTHER = dict(resolution=32, channels=3, n_colors=512, augment='none', val_fraction=0.1)

# The value of a field that follows the dataset (see `derive_data_settings`).
AUTO = {'resolution': 0, 'channels': 0, 'n_colors': 0, 'augment': 'auto', 'val_fraction': -1.0}
# Other datasets: a stored square image side up to this is the resolution (larger images are resized to it, as the
# paper does); grayscale palettes get this many grey levels (RGB: 512, the paper's).
MAX_AUTO_RESOLUTION = 32
GRAYSCALE_N_COLORS = 64


def default_data_config(name: str = 'digits', *, auto: bool = False) -> ml_collections.ConfigDict:
    """Returns the data config for `name` (the embedded 8x8 digits by default); each field's comment says what it is.

    With ``auto=True`` the fields in `AUTO` are left at their AUTO values, to be derived by `derive_data_settings`
    after command-line overrides (the configs in configs/ do this); otherwise they hold `name`'s preset.
    """
    preset = dict(AUTO) if auto else PRESETS.get(name, _OTHER)
    cfg = ml_collections.ConfigDict()
    # TFDS name: digits, cifar10, fashion_mnist, imagenet2012, or any imported with igpt_jax.data.import_data
    cfg.name = name
    # TFDS data_dir (local or gs://); None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    cfg.data_dir = ml_collections.FieldReference(None, field_type=str)
    cfg.resolution = preset['resolution']  # images become resolution x resolution; 0: the dataset's (<= 32)
    cfg.channels = preset['channels']  # 3 (RGB) or 1 (grayscale); 0: the stored data's
    cfg.n_colors = preset['n_colors']  # palette size k = model.vocab_size; 0: the dataset's (RGB 512, gray 64)
    # .npy palette; None: fitted on first use, saved as {data_dir}/{name}/palette_k{k}_c{channels}_r{res}_s{seed}.npy
    cfg.palette_path = ml_collections.FieldReference(None, field_type=str)
    cfg.palette_seed = 0  # k-means seed of the palette
    cfg.palette_sample_pixels = 1_000_000  # pixels sampled for the k-means palette
    cfg.augment = preset['augment']  # cifar | shift | imagenet | none (training only); auto: the dataset preset's
    cfg.imagenet_resize_range = (256, 384)  # 'imagenet' augmentation: random resize of the shorter side
    cfg.imagenet_crop = 224  # 'imagenet' augmentation: random square crop
    cfg.cifar_pad = 4  # 'cifar' and 'shift' augmentations: reflection padding before the random crop
    cfg.val_fraction = preset['val_fraction']  # validation = this last fraction of train; -1: 0.04 imagenet, else 0.1
    cfg.fold_val = False  # True: 'train' uses all train records (final runs, paper 3.1); 'validation' still held out
    cfg.train_split = 'train'  # TFDS split behind 'train' and 'validation'
    # TFDS split behind 'test'; None: 'validation' for imagenet2012 (the paper's test set), else 'test'
    cfg.test_split = ml_collections.FieldReference(None, field_type=str)
    cfg.allow_unlabeled = False  # accept label -1 (no label), e.g. to pretrain on unlabeled images
    cfg.shuffle_seed = 0  # default seed of the training order and augmentation
    cfg.num_workers = 0  # Grain worker processes (0 = in-process, best on 2 cores)
    cfg.read_threads = 4  # Grain threads building batches
    cfg.prefetch_buffer_size = 16  # batches buffered ahead
    # import a missing dataset on first use: digits from scikit-learn, others from import_source or {name}.npz
    # in $IGPT_NPZ_DIR or the project's shared/data directory
    cfg.auto_import = True
    cfg.import_source = ml_collections.FieldReference(None, field_type=str)  # .npz or image folder for auto_import
    # what a batch holds: 'palette' tokens of the pixels (iGPT); 'raw' images in [-1, 1] under 'image' (the VQ-VAE
    # job); 'codes' VQ-VAE code grids stored by the tokenize job, used as tokens as they are (n_colors = codebook size,
    # resolution = grid side, channels 1, no palette, no augmentation)
    cfg.tokens = 'palette'
    return cfg


def resolve_data_dir(data_dir: str | None) -> str:
    """config data_dir -> $TFDS_DATA_DIR -> ~/tensorflow_datasets (TFDS's own default)."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def derive_data_settings(cfg: ml_collections.ConfigDict, stored_shape: tuple[Any, Any, Any] | None) -> dict[str, Any]:
    """The values of `cfg`'s AUTO fields, from its dataset name and the stored image shape.

    Args:
      cfg: a data config (not changed).
      stored_shape: (height, width, channels) of the stored images (height and width None when they vary), or None
        when unknown (not imported yet, no source found).

    Returns:
      {field: value} for each field of `cfg` that is at its AUTO value.
    """
    preset = PRESETS.get(cfg.name)
    out: dict[str, Any] = {}
    channels = cfg.channels
    if channels == AUTO['channels']:
        channels = out['channels'] = int(stored_shape[2]) if stored_shape else (preset or _OTHER)['channels']
    if cfg.resolution == AUTO['resolution']:
        if preset:
            out['resolution'] = preset['resolution']
        elif stored_shape and stored_shape[0] and stored_shape[0] == stored_shape[1]:
            out['resolution'] = min(int(stored_shape[0]), MAX_AUTO_RESOLUTION)
        else:
            out['resolution'] = MAX_AUTO_RESOLUTION
    if cfg.n_colors == AUTO['n_colors']:
        if preset and preset['channels'] == channels:
            out['n_colors'] = preset['n_colors']
        else:
            out['n_colors'] = _OTHER['n_colors'] if channels == 3 else GRAYSCALE_N_COLORS
    if cfg.augment == AUTO['augment']:
        out['augment'] = (preset or _OTHER)['augment']
    if cfg.val_fraction == AUTO['val_fraction']:
        out['val_fraction'] = (preset or _OTHER)['val_fraction']
    return out


def stored_image_shape(name: str, data_dir: str, import_source: str | None) -> tuple[Any, Any, Any] | None:
    """(height, width, channels) of a dataset's images, read without loading any image.

    From, in order: the fixed features of a catalog dataset; ``features.json`` of the newest prepared version in
    ``data_dir/name``; the header of ``x_train`` in a .npz import source; 3 channels for an image folder (the
    importer's default). None when none of these exists.
    """
    spec = builders.catalog_spec(name)
    if spec is not None:
        return tuple(spec.image_shape)

    root = epath.Path(data_dir) / name
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if (p / 'features.json').exists()), key=lambda p: p.name)
        if versions:
            return _shape_from_features_json((versions[-1] / 'features.json').read_text())
    if import_source:
        source = epath.Path(import_source)
        if source.is_dir():
            return (None, None, 3)
        if source.suffix == '.npz' and source.exists():
            return _npz_image_shape(source)
    return None


def _shape_from_features_json(text: str) -> tuple[Any, Any, Any] | None:
    try:
        dims = json.loads(text)['featuresDict']['features']['image']['image']['shape']['dimensions']
        h, w, c = (int(d) if int(d) > 0 else None for d in dims)
    except (KeyError, ValueError, TypeError):
        return None
    return (h, w, c)


def _npz_image_shape(path: Any) -> tuple[Any, Any, Any] | None:
    """x_train's image shape from the .npy header inside a .npz (the arrays are not read)."""


    try:
        with path.open('rb') as f, zipfile.ZipFile(f) as archive, archive.open('x_train.npy') as member:
            major, _ = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None
    if len(shape) == 3:
        return (shape[1], shape[2], 1)
    if len(shape) == 4:
        return (shape[1], shape[2], 1 if shape[3] in (1, 2) else 3)
    return None
