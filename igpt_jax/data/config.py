"""Default data config (``config.data``) that the model and job configs start from."""

from __future__ import annotations

import os

import ml_collections

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


def default_data_config(name: str = 'digits') -> ml_collections.ConfigDict:
    """Returns the data config for `name` (the embedded 8x8 digits by default).

    Fields:
      name: TFDS name ('digits', 'cifar10', 'fashion_mnist', 'imagenet2012', or
        any name imported with ``python -m igpt_jax.data.import_data``).
      data_dir: TFDS data_dir; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
        May be a gs:// path (passed through to TFDS/etils).
      resolution: input resolution; images become resolution x resolution.
      channels: 3 (RGB) or 1 (grayscale).
      n_colors: palette size k (= the model's vocabulary).
      palette_path: .npy palette; None -> fitted on first use and saved as
        {data_dir}/{name}/palette_k{k}_r{resolution}_s{seed}.npy.
      palette_seed, palette_sample_pixels: k-means seed and sample size.
      augment: 'cifar' | 'imagenet' | 'none', training only.
      imagenet_resize_range, imagenet_crop: 'imagenet' augmentation geometry.
      cifar_pad: reflection padding of the 'cifar' augmentation.
      val_fraction: validation = the last val_fraction of the stored train split.
      fold_val: True -> 'train' uses all train records (final runs, paper 3.1);
        'validation' still returns the held-out slice.
      train_split / test_split: TFDS splits behind our 'train'/'validation' and
        'test'; test_split None -> 'validation' for imagenet2012 (the paper's test
        set), else 'test'.
      allow_unlabeled: accept label -1 (TFDS's "no label"), e.g. for pretraining
        on unlabeled images; otherwise any label outside [0, classes) is an error.
      shuffle_seed: default seed of the training order and augmentation.
      num_workers: Grain worker processes (0 = in-process, best on 2 cores).
      read_threads, prefetch_buffer_size: Grain ReadOptions of the pipeline (threads
        building batches, and batches buffered ahead).
      auto_import: import the dataset on first use if it is missing: digits from
        scikit-learn; other names from import_source, else from {name}.npz found
        in $IGPT_NPZ_DIR or the project's shared/data directory.
      import_source: optional .npz or image folder for auto_import.
      tokens: what a batch holds. 'palette': palette tokens of the pixels (iGPT);
        'raw': the images as float32 in [-1, 1] under 'image' (the VQ-VAE job);
        'codes': the dataset stores VQ-VAE code grids (written by the tokenize job),
        which are the tokens as they are (n_colors = the codebook size,
        resolution = the grid side, channels 1, no palette, no augmentation).
    """
    preset = PRESETS.get(name, _OTHER)
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.data_dir = ml_collections.FieldReference(None, field_type=str)
    cfg.resolution = preset['resolution']
    cfg.channels = preset['channels']
    cfg.n_colors = preset['n_colors']
    cfg.palette_path = ml_collections.FieldReference(None, field_type=str)
    cfg.palette_seed = 0
    cfg.palette_sample_pixels = 1_000_000
    cfg.augment = preset['augment']
    cfg.imagenet_resize_range = (256, 384)
    cfg.imagenet_crop = 224
    cfg.cifar_pad = 4
    cfg.val_fraction = preset['val_fraction']
    cfg.fold_val = False
    cfg.train_split = 'train'
    cfg.test_split = ml_collections.FieldReference(None, field_type=str)
    cfg.allow_unlabeled = False
    cfg.shuffle_seed = 0
    cfg.num_workers = 0
    cfg.read_threads = 4
    cfg.prefetch_buffer_size = 16  # batches
    cfg.auto_import = True
    cfg.import_source = ml_collections.FieldReference(None, field_type=str)
    cfg.tokens = 'palette'
    return cfg


def resolve_data_dir(data_dir: str | None) -> str:
    """config data_dir -> $TFDS_DATA_DIR -> ~/tensorflow_datasets (TFDS's own default)."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')
