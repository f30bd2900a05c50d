"""Which records a split reads, and the reader of those records.

Splits: 'train' and 'validation' are cut from the TFDS train split (validation = its last ``val_fraction`` of records;
TFDS stores records in a fixed pseudo-random order, so that is a random, reproducible subset); ``fold_val`` trains on
all of it. 'test' is the TFDS test split (ImageNet: 'validation').

`ImageRecords` is the Grain data source of a contiguous range of a split's records: images decoded with Pillow and
converted to the config's channels (or, with ``data.tokens='codes'``, the stored code grids), labels checked, records
past the end padded (mask False). Its errors (`DataError`) name the dataset, split and record.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from igpt_jax.data import builders
from igpt_jax.data.auto_import import ensure_dataset
from igpt_jax.data.config import resolve_data_dir

SPLITS = ('train', 'validation', 'test')
TOKENS = ('palette', 'raw', 'codes')


class DataError(ValueError):
    """Bad data in a dataset; the message names the dataset, split and record."""


def tokens_kind(data_cfg: ml_collections.ConfigDict) -> str:
    """data.tokens ('palette' when the config predates it)."""
    kind = data_cfg.get('tokens', 'palette')
    if kind not in TOKENS:
        raise ValueError(f'data.tokens must be one of {TOKENS}, got {kind!r}.')
    return kind


def dataset_builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder of config.data's dataset (imported first if `ensure_dataset` may and must)."""
    data_dir = ensure_dataset(data_cfg)
    return tfds.builder(data_cfg.name, data_dir=data_dir)


def _test_split(data_cfg: ml_collections.ConfigDict) -> str:
    if data_cfg.get('test_split'):
        return data_cfg.test_split
    return 'validation' if data_cfg.name == 'imagenet2012' else 'test'


def split_bounds(data_cfg: ml_collections.ConfigDict, split: str,
                 builder: tfds.core.DatasetBuilder | None = None) -> tuple[str, int, int]:
    """Our split -> (TFDS split, first record, end record)."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
    builder = builder or dataset_builder(data_cfg)
    splits = builder.info.splits
    if split == 'test':
        tfds_split = _test_split(data_cfg)
        if tfds_split not in splits:
            raise ValueError(f'Dataset {data_cfg.name!r} has no split {tfds_split!r} (has {list(splits.keys())}).')
        return tfds_split, 0, splits[tfds_split].num_examples
    tfds_split = data_cfg.get('train_split', 'train')
    n = splits[tfds_split].num_examples
    frac = float(data_cfg.val_fraction)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {frac}.')
    n_val = int(round(n * frac))
    if split == 'validation':
        if n_val == 0:
            raise ValueError(
                f'Dataset {data_cfg.name!r}: no validation split (val_fraction={frac}, {n} train records).')
        return tfds_split, n - n_val, n
    return tfds_split, 0, (n if data_cfg.fold_val else n - n_val)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples of 'train', 'validation' or 'test' under this config."""
    _, start, stop = split_bounds(data_cfg, split)
    return stop - start


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the dataset's label feature."""
    return int(dataset_builder(data_cfg).info.features['label'].num_classes)


class ImageRecords:
    """Grain data source: decoded, channel-converted records [start, stop) of a TFDS split.

    Records past the end (up to `pad_to`) are padding: a zero image of the input
    resolution with mask False. Errors name the dataset, split and record index.
    """

    def __init__(self, *, name: str, data_dir: str, tfds_split: str, split: str, start: int,
                 stop: int, channels: int, classes: int, allow_unlabeled: bool,
                 resolution: int, min_side: int | None = None, pad_to: int | None = None,
                 field: str = 'image'):
        self.field = field  # 'image' (encoded image) or 'codes' (a stored code grid, data.tokens='codes')
        self.name, self.data_dir, self.tfds_split, self.split = name, data_dir, tfds_split, split
        self.start, self.stop = start, stop
        self.channels, self.classes, self.allow_unlabeled = channels, classes, allow_unlabeled
        self.resolution, self.min_side = resolution, min_side
        self.pad_to = max(pad_to or 0, stop - start)
        self._source: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.pad_to

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state['_source'] = None  # reopened lazily in each (worker) process.
        state['_lock'] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _where(self, record: int) -> str:
        shown = repr(self.split)
        if self.split != self.tfds_split:
            shown += f' (TFDS split {self.tfds_split!r})'
        return f'dataset {self.name!r}, split {shown}, record {record}'

    @property
    def source(self) -> Any:
        """The TFDS data source (images left encoded), opened once per process."""
        if self._source is None:
            with self._lock:
                if self._source is None:
                    decoders = {'image': tfds.decode.SkipDecoding()} if self.field == 'image' else None
                    self._source = tfds.data_source(
                        self.name, split=self.tfds_split, data_dir=self.data_dir, download=False,
                        decoders=decoders)
        return self._source

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.pad_to:
            raise IndexError(f'{i} out of range [0, {self.pad_to}).')
        return self.start + i

    def _read(self, record: int) -> Any:
        try:
            return self.source[record]
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(f'{self._where(record)}: cannot read the record ({type(e).__name__}: {e}).') from e

    def _padding(self) -> dict[str, Any]:
        return {'image': np.zeros((self.resolution, self.resolution, self.channels), np.uint8),
                'label': np.int32(0), 'index': np.int32(-1), 'mask': np.bool_(False)}

    def _example(self, record: int, raw: Any) -> dict[str, Any]:
        try:
            if self.field == 'codes':
                image = np.asarray(raw['codes'], np.int32)[..., None]  # [g, g, 1]
            else:
                image = builders.decode_image(raw['image'], self.channels, self.min_side)
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(f'{self._where(record)}: cannot decode the image ({type(e).__name__}: {e}).') from e
        label = int(raw['label'])
        if not (0 <= label < self.classes or (label == -1 and self.allow_unlabeled)):
            extra = ' (-1 = unlabeled; set allow_unlabeled=True to accept it)' if label == -1 else ''
            raise DataError(f'{self._where(record)}: label {label} is outside [0, {self.classes}){extra}.')
        return {'image': image, 'label': np.int32(label), 'index': np.int32(record), 'mask': np.bool_(True)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self._check(i)
        if record >= self.stop:
            return self._padding()
        return self._example(record, self._read(record))

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read (array_record reads a batch ~10x faster than one by one)."""
        records = [self._check(i) for i in indices]
        real = [r for r in records if r < self.stop]
        try:
            raws = dict(zip(real, self.source.__getitems__(real))) if real else {}
        except Exception:  # pylint: disable=broad-except
            raws = {r: self._read(r) for r in real}  # one by one, to name the bad record.
        return [self._example(r, raws[r]) if r < self.stop else self._padding() for r in records]


def image_records(data_cfg: ml_collections.ConfigDict, split: str, start: int, stop: int,
                  pad_to: int | None = None, builder: tfds.core.DatasetBuilder | None = None) -> ImageRecords:
    """The reader of records [start, stop) of `split` (positions within the split), padded to `pad_to`.

    Large JPEGs may be decoded at a reduced scale, keeping both sides at least twice what the augmentation's output
    needs (`builders.decode_image`'s min_side).
    """
    builder = builder or dataset_builder(data_cfg)
    tfds_split, lo, hi = split_bounds(data_cfg, split, builder)
    assert lo <= lo + start <= lo + stop <= hi, (start, stop, lo, hi)
    res = int(data_cfg.resolution)
    if data_cfg.augment == 'imagenet':  # keep >= 2 source pixels per output pixel after the crop.
        max_short = data_cfg.imagenet_resize_range[1]
        min_side = math.ceil(2 * res * max_short / data_cfg.imagenet_crop)
    else:
        min_side = 2 * res
    codes = tokens_kind(data_cfg) == 'codes'
    return ImageRecords(
        name=data_cfg.name, data_dir=resolve_data_dir(data_cfg.data_dir), tfds_split=tfds_split,
        split=split, start=lo + start, stop=lo + stop, channels=1 if codes else int(data_cfg.channels),
        classes=int(builder.info.features['label'].num_classes),
        allow_unlabeled=bool(data_cfg.get('allow_unlabeled', False)), resolution=res,
        min_side=min_side, pad_to=pad_to, field='codes' if codes else 'image')


def shard_range(n: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """Records [start, stop) of shard `options.shard_index` out of `options.shard_count`.

    Contiguous, disjoint ranges covering [0, n) (Grain's even split): sizes differ
    by at most one, or with drop_remainder all are n // shard_count.
    """
    per, rem = divmod(n, options.shard_count)
    i = options.shard_index
    if options.drop_remainder:
        return per * i, per * (i + 1)
    return per * i + min(i, rem), per * (i + 1) + min(i + 1, rem)
