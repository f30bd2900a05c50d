r"""Checks that an imported TFDS dataset equals its .npz archive, record by record.

Usage:
  python -m igpt_jax.data.verify --npz=/work/shared/data/cifar10.npz --name=cifar10 \
      --data_dir=/tmp/tfds

TFDS stores the records of a split sorted by md5(split name + key); our
builders key examples by their index in the archive (as TFDS's own builders
do), so record r of the stored split is archive example ``official_order(split,
n)[r]``. Where the dataset has an ``id`` feature ('train_00042') it must agree.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from tensorflow_datasets.core import hashing

from igpt_jax.data import builders


def official_order(split: str, n: int) -> np.ndarray:
    """Archive index of each stored record of a split written with keys 0..n-1."""
    hasher = hashing.Hasher(split)
    return np.array(sorted(range(n), key=hasher.hash_key), dtype=np.int64)


def verify_split(name: str, data_dir: str, split: str, x: np.ndarray, y: np.ndarray,
                 limit: int | None = None) -> int:
    """Compares stored records with the archive arrays; returns the number checked.

    Raises:
      AssertionError: naming the first record that differs.
    """
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                           decoders={'image': tfds.decode.SkipDecoding()})
    if len(src) != len(x):
        raise AssertionError(f'{name} {split}: {len(src)} records, archive has {len(x)}.')
    x = x if x.ndim == 4 else x[..., None]
    order = official_order(split, len(x))
    n = len(x) if limit is None else min(limit, len(x))
    batch = 1000
    for lo in range(0, n, batch):
        records = list(range(lo, min(n, lo + batch)))
        for r, raw in zip(records, src.__getitems__(records)):
            i = int(order[r])
            if 'id' in raw:
                got_id = raw['id'].decode() if isinstance(raw['id'], bytes) else str(raw['id'])
                if got_id != f'{split}_{i:05d}':
                    raise AssertionError(f'{name} {split} record {r}: id {got_id}, expected {split}_{i:05d}.')
            image = builders.decode_image(raw['image'], x.shape[-1])
            if not np.array_equal(image, x[i]):
                raise AssertionError(f'{name} {split} record {r} (archive {i}): pixels differ.')
            if int(raw['label']) != int(y[i]):
                raise AssertionError(f'{name} {split} record {r} (archive {i}): label {raw["label"]} != {y[i]}.')
    return n


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    t0 = time.time()
    with np.load(f.npz) as z:
        arrays = {k: z[k] for k in z.files}
    for split in ('train', 'test'):
        n = verify_split(f.name, f.data_dir, split, arrays[f'x_{split}'], arrays[f'y_{split}'].reshape(-1))
        print(f'{f.name} {split}: all {n} records equal the archive (pixels, labels, official order).')
    print(f'verified in {time.time() - t0:.1f}s')


if __name__ == '__main__':
    flags.DEFINE_string('npz', None, 'The archive that was imported.')
    flags.DEFINE_string('name', None, 'TFDS name.')
    flags.DEFINE_string('data_dir', None, 'TFDS data_dir.')
    flags.mark_flags_as_required(['npz', 'name', 'data_dir'])
    app.run(main)
