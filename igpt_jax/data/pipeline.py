"""The input pipeline: TFDS records -> Grain -> palette tokens in raster order.

    tfds.data_source (array_record, random access; images decoded with Pillow)
      -> this process's shard of the records (jax.process_index/process_count)
      -> train: shuffle per epoch, repeat forever, augment (paper 3.1)
         eval:  in order, one pass, eval resize, padded to whole batches
      -> batch -> palette tokens (one lookup-table gather per batch)
      -> {'tokens': int32 [b, res*res], 'label': int32 [b], 'mask': bool [b],
          'index': int32 [b] (record index in the TFDS split, -1 for padding)}

``data.tokens`` changes the last step: 'raw' yields the images as float32 in
[-1, 1] ('image' [b, res, res, C]) for the VQ-VAE job; 'codes' reads datasets of
VQ-VAE code grids (the tokenize job's) whose stored grid already is the tokens.

Splits: 'train' and 'validation' are cut from the TFDS train split (validation
= its last ``val_fraction`` of records; TFDS stores records in a fixed
pseudo-random order, so that is a random, reproducible subset); ``fold_val``
trains on all of it. 'test' is the TFDS test split (ImageNet: 'validation').

Every element is a function of (seed, position), so the iterator's Grain state
(a position) restores exactly; :func:`iterator_save_args` and
:func:`iterator_restore_args` put it in an Orbax checkpoint next to the model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax.data import augment, builders
from igpt_jax.data.auto_import import ensure_dataset  # noqa: F401  (part of this API)
from igpt_jax.data.config import resolve_data_dir  # noqa: F401  (part of this API)
from igpt_jax.data.palette import Palette, _pack

SPLITS = ('train', 'validation', 'test')
TOKENS = ('palette', 'raw', 'codes')


class DataError(ValueError):
    """Bad data in a dataset; the message names the dataset, split and record."""


# ----------------------------------------------------------------- dataset
def _builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    data_dir = ensure_dataset(data_cfg)
    return tfds.builder(data_cfg.name, data_dir=data_dir)


def _test_split(data_cfg: ml_collections.ConfigDict) -> str:
    if data_cfg.get('test_split'):
        return data_cfg.test_split
    return 'validation' if data_cfg.name == 'imagenet2012' else 'test'


def _split_bounds(data_cfg: ml_collections.ConfigDict, split: str,
                  builder: tfds.core.DatasetBuilder | None = None) -> tuple[str, int, int]:
    """Our split -> (TFDS split, first record, end record)."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
    builder = builder or _builder(data_cfg)
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
    _, start, stop = _split_bounds(data_cfg, split)
    return stop - start


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the dataset's label feature."""
    return int(_builder(data_cfg).info.features['label'].num_classes)


# ------------------------------------------------------------------ reader
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


@dataclasses.dataclass(frozen=True)
class _Augment:
    """Per-example transform of config.data.augment: training (random) or evaluation."""

    style: str
    resolution: int
    cifar_pad: int
    resize_range: tuple[int, int]
    crop: int

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return augment.train_transform(
            image, rng, style=self.style, resolution=self.resolution, cifar_pad=self.cifar_pad,
            imagenet_resize_range=self.resize_range, imagenet_crop=self.crop)

    def eval(self, image: np.ndarray) -> np.ndarray:
        return augment.eval_transform(image, style=self.style, resolution=self.resolution,
                                      imagenet_crop=self.crop)


class _ReadBatch(grain.transforms.MapWithIndex):
    """Batch of record positions -> batch of transformed examples (stacked arrays).

    Reads the records in one batched read, decodes them, and applies the training
    augmentation (each example with its own generator seeded by (seed, its position
    in the global example stream), so the augmentation does not depend on how the
    global batch is split between processes) or the evaluation resize.
    """

    def __init__(self, reader: ImageRecords, transform: _Augment, train: bool, seed: int,
                 rows: Sequence[int], stride: int):
        self.reader, self.transform, self.train = reader, transform, train
        self.seed, self.rows, self.stride = seed, tuple(int(r) for r in rows), stride

    def map_with_index(self, index: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        positions = np.asarray(positions)
        records = [int(p) % len(self.reader) for p in positions]  # positions count up through epochs.
        examples = self.reader._getitems(records)  # pylint: disable=protected-access
        images = []
        for j, ex in enumerate(examples):
            if not ex['mask'] or self.transform is None:
                images.append(ex['image'])
            elif self.train:
                rng = np.random.default_rng((self.seed, index * self.stride + self.rows[j]))
                images.append(self.transform.train(ex['image'], rng))
            else:
                images.append(self.transform.eval(ex['image']))
        return {'image': np.stack(images),  # [b, res, res, C]
                'label': np.array([ex['label'] for ex in examples], np.int32),
                'index': np.array([ex['index'] for ex in examples], np.int32),
                'mask': np.array([ex['mask'] for ex in examples], bool)}


class _Slice(grain.transforms.Map):
    """This process's rows of a global batch of record positions."""

    def __init__(self, rows: Sequence[int]):
        self.rows = np.asarray(rows, np.int64)

    def map(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions)[self.rows]


class _ToUnit(grain.transforms.Map):
    """Batch of uint8 images -> float32 images in [-1, 1] (data.tokens='raw')."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, 'image': batch['image'].astype(np.float32) / np.float32(127.5) - np.float32(1.0)}


class _Codes(grain.transforms.Map):
    """Batch of stored code grids -> tokens in raster order (data.tokens='codes')."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = batch['image']  # [b, g, g, 1]
        return {'tokens': codes.reshape(codes.shape[0], -1).astype(np.int32), 'label': batch['label'],
                'mask': batch['mask'], 'index': batch['index']}


class _Tokenize(grain.transforms.Map):
    """Batch of images -> palette tokens in raster order, via the palette's lookup table."""

    def __init__(self, lut: np.ndarray):
        self.lut = lut

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch['image']  # [b, res, res, C]
        tokens = self.lut[_pack(images)].reshape(images.shape[0], -1).astype(np.int32)  # [b, res*res]
        return {'tokens': tokens, 'label': batch['label'], 'mask': batch['mask'], 'index': batch['index']}


def tokens_kind(data_cfg: ml_collections.ConfigDict) -> str:
    """data.tokens ('palette' when the config predates it)."""
    kind = data_cfg.get('tokens', 'palette')
    if kind not in TOKENS:
        raise ValueError(f'data.tokens must be one of {TOKENS}, got {kind!r}.')
    return kind


def code_palette(k: int) -> Palette:
    """The stand-in palette of a dataset of codes: code i -> grey level i / (k - 1) in [-1, 1]. Jobs that keep a
    palette with the model (checkpoints, probes) keep this one; it only says how many tokens there are."""
    return Palette(np.linspace(-1.0, 1.0, k, dtype=np.float32)[:, None])


def check_codes_dataset(data_cfg: ml_collections.ConfigDict,
                        builder: tfds.core.DatasetBuilder | None = None) -> dict[str, Any]:
    """The metadata of a dataset of codes, checked against data.n_colors and data.resolution.

    Raises:
      ValueError: the dataset holds no codes, or a vocabulary or grid other than the config's.
    """
    builder = builder or _builder(data_cfg)
    meta = dict(builder.info.metadata or {})
    if 'codes' not in builder.info.features or 'vocab_size' not in meta:
        raise ValueError(f'data.tokens=codes but dataset {data_cfg.name!r} holds no VQ-VAE codes (features '
                         f'{sorted(builder.info.features.keys())}); write one with the tokenize job.')
    if int(meta['vocab_size']) != int(data_cfg.n_colors):
        raise ValueError(f'dataset {data_cfg.name!r} holds codes of a {meta["vocab_size"]}-code VQ-VAE but '
                         f'data.n_colors={data_cfg.n_colors} (the model\'s vocabulary): set both to '
                         f'{meta["vocab_size"]}.')
    if int(meta['grid']) != int(data_cfg.resolution):
        raise ValueError(f'dataset {data_cfg.name!r} holds {meta["grid"]}x{meta["grid"]} code grids but '
                         f'data.resolution={data_cfg.resolution}.')
    return meta


def _augment(data_cfg: ml_collections.ConfigDict) -> _Augment | None:
    if tokens_kind(data_cfg) == 'codes':
        return None  # code grids are read as stored
    if data_cfg.augment not in augment.STYLES:
        raise ValueError(f'augment must be one of {augment.STYLES}, got {data_cfg.augment!r}.')
    return _Augment(data_cfg.augment, int(data_cfg.resolution), int(data_cfg.cifar_pad),
                    tuple(int(v) for v in data_cfg.imagenet_resize_range), int(data_cfg.imagenet_crop))


def _records(data_cfg: ml_collections.ConfigDict, split: str, start: int, stop: int,
             pad_to: int | None = None, builder: tfds.core.DatasetBuilder | None = None) -> ImageRecords:
    builder = builder or _builder(data_cfg)
    tfds_split, lo, hi = _split_bounds(data_cfg, split, builder)
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


# ----------------------------------------------------------------- palette
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
    builder = _builder(data_cfg)
    n = builder.info.splits[data_cfg.get('train_split', 'train')].num_examples
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.val_fraction, cfg.fold_val = 0.0, True  # the whole stored train split.
    reader = _records(cfg, 'train', 0, n, builder=builder)
    n_img = min(n, max(1, math.ceil(4 * num_pixels / data_cfg.resolution ** 2)), 200_000)
    picks = np.sort(np.random.default_rng(seed).choice(n, size=n_img, replace=False))
    transform = _augment(data_cfg)

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
    if tokens_kind(data_cfg) == 'codes':
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


# ---------------------------------------------------------------- iterator
def make_iterator(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    palette: Palette | None = None,
    rows: HostRows | None = None,
) -> grain.DatasetIterator:
    """A Grain iterator of token batches for this process.

    Args:
      data_cfg: config.data.
      split: 'train', 'validation' or 'test'.
      batch_size: examples per batch in THIS process.
      train: True -> shuffled each epoch, augmented, infinite, full batches only.
        False -> in order, one pass, no augmentation, the last batch padded
        (mask False); every shard yields the same number of batches, so all
        processes stay in step.
      seed: shuffle/augmentation seed (default config shuffle_seed).
      shard_index, shard_count: this process's shard (default jax.process_index()
        and jax.process_count()). Training: every process cuts the same global batches
        (batch_size x shard_count) from one shuffled order and reads its slice of each.
        Evaluation: contiguous, disjoint record ranges.
      palette: the palette (default :func:`load_or_fit_palette`).
      rows: this process's rows of every global batch (:func:`host_rows`, what its devices hold), instead of
        `batch_size` and the shard arguments. Processes may share rows (pods with more hosts than examples per
        step). Training as above; evaluation then also cuts global batches of the split in order (the last one
        padded) and reads these rows of each.

    Returns:
      An iterator of dicts of numpy arrays: tokens int32 [b, res*res], label
      int32 [b], mask bool [b], index int32 [b]; with get_state()/set_state().
      With data.tokens='raw', image float32 [b, res, res, C] in [-1, 1] instead of
      tokens; with 'codes', the stored code grids as tokens (the palette unused).

    Raises:
      ValueError: bad split/shard/batch arguments, or a palette of the wrong shape.
    """
    if rows is not None:
        batch_size = rows.size
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if rows is None and train:
        rows = HostRows(batch_size * shard_count, tuple(range(shard_index * batch_size, (shard_index + 1) * batch_size)))
    options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=train)
    builder = _builder(data_cfg)
    _, lo, hi = _split_bounds(data_cfg, split, builder)
    n = hi - lo
    if n == 0:
        raise ValueError(f'Dataset {data_cfg.name!r} split {split!r} is empty.')
    kind = tokens_kind(data_cfg)
    if kind == 'palette':
        palette = palette if palette is not None else load_or_fit_palette(data_cfg)
        palette.check_shape(data_cfg.n_colors, data_cfg.channels, what=f'dataset {data_cfg.name!r}')
        tokenize = _Tokenize(palette.lookup_table())
    elif kind == 'codes':
        check_codes_dataset(data_cfg, builder)
        tokenize = _Codes()
    else:
        tokenize = _ToUnit()
    transform = _augment(data_cfg)
    seed = int(data_cfg.shuffle_seed if seed is None else seed) % 2**32

    if train:
        # Every process shuffles the whole split with the same seed and cuts the same global batches; each reads
        # only its slice of every global batch. The global batch (and its augmentation) is therefore the same for
        # any number of processes, so a run's losses do not depend on how many hosts feed it.
        assert rows is not None
        if n < rows.global_batch:
            raise ValueError(f'Dataset {data_cfg.name!r} split {split!r} has {n} records, fewer than one global '
                             f'batch of {rows.global_batch} (rows {rows} in this process).')
        reader = _records(data_cfg, split, 0, n, builder=builder)
        positions = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)  # epoch e reshuffles
        ds = (positions.batch(rows.global_batch, drop_remainder=True)
              .map(_Slice(rows.rows))
              .map_with_index(_ReadBatch(reader, transform, train, seed, rows.rows, rows.global_batch)))
    elif rows is not None:
        # Global batches of the split in order, the last padded; every process reads its rows of each.
        padded = math.ceil(n / rows.global_batch) * rows.global_batch
        reader = _records(data_cfg, split, 0, n, pad_to=padded, builder=builder)
        ds = (grain.MapDataset.range(padded).batch(rows.global_batch, drop_remainder=False)
              .map(_Slice(rows.rows))
              .map_with_index(_ReadBatch(reader, transform, train, seed, rows.rows, rows.global_batch)))
    else:
        start, stop = shard_range(n, options)
        per_shard = math.ceil(n / shard_count)
        padded = math.ceil(per_shard / batch_size) * batch_size
        reader = _records(data_cfg, split, start, stop, pad_to=padded, builder=builder)
        positions = grain.MapDataset.range(padded)
        ds = (positions.batch(batch_size, drop_remainder=False)
              .map_with_index(_ReadBatch(reader, transform, train, seed, range(batch_size), batch_size)))
    ds = ds.map(tokenize)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(data_cfg.read_threads), prefetch_buffer_size=int(data_cfg.prefetch_buffer_size)))
    if int(data_cfg.num_workers) > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)))
    return iter(it_ds)


# ------------------------------------------------------------- multi-host
@dataclasses.dataclass(frozen=True)
class HostRows:
    """The rows of every global batch of `global_batch` examples that one process loads (sorted, distinct)."""

    global_batch: int
    rows: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        """'0:3', or '0:1,8:9' for rows in several ranges."""
        ranges, start = [], self.rows[0]
        for prev, row in zip(self.rows, self.rows[1:] + (None,)):
            if row is None or row != prev + 1:
                ranges.append(f'{start}:{prev + 1}')
                start = row
        return ','.join(ranges)

    def local_slice(self, start: int, stop: int) -> slice:
        """Global rows [start, stop) (all held here) -> their positions in this process's local batch."""
        local = int(np.searchsorted(self.rows, start))
        if stop <= start or self.rows[local:local + stop - start] != tuple(range(start, stop)):
            raise ValueError(f'A local device needs rows {start}:{stop} but this process loaded rows {self} of the '
                             f'global batch of {self.global_batch}.')
        return slice(local, local + stop - start)


def host_rows(
    global_batch: int,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    *,
    process_index: int | None = None,
) -> HostRows:
    """The rows of a global batch that this process's devices hold when it is sharded over `batch_axes`.

    With at least one example per process these are the process's own disjoint rows (not always adjacent: a
    topology-aware TPU mesh may give a host's chips batch shards 0 and 8). On pods with more hosts
    than examples per step (e.g. a batch of 64 on 128 hosts, where a model-parallel axis spans two hosts)
    several processes hold the same rows: each loads them (every process cuts the same global batches) and
    `make_global_batch` places them on its devices.

    Args:
      global_batch: examples per global batch.
      mesh: the device mesh.
      batch_axes: mesh axes the batch is split over (axes not in the mesh are skipped).
      process_index: the process (default: this one).

    Raises:
      ValueError: see `rows_by_process`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    by_process = rows_by_process(global_batch, mesh, batch_axes)
    if process_index not in by_process:
        raise ValueError(f'Process {process_index} has no device in mesh {dict(mesh.shape)}.')
    return by_process[process_index]


def rows_by_process(
    global_batch: int,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    process_of: Any = None,
) -> dict[int, HostRows]:
    """`host_rows` of every process of the mesh (the AOT compile job reports it for a whole pod).

    Args:
      global_batch, mesh, batch_axes: as for `host_rows`.
      process_of: device -> process index (default ``device.process_index``); lets tests emulate hosts.

    Raises:
      ValueError: the batch does not divide over the batch axes.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    n_shards = math.prod(mesh.shape[a] for a in axes)
    if global_batch < 1 or global_batch % n_shards:
        raise ValueError(f'Global batch {global_batch} does not divide over the {n_shards} shards of mesh axes '
                         f'{axes} (mesh {dict(mesh.shape)}).')
    process_of = process_of or (lambda d: d.process_index)
    held: dict[int, set[tuple[int, int]]] = {}
    index_map = NamedSharding(mesh, PartitionSpec(axes)).devices_indices_map((global_batch,))
    for device, index in index_map.items():
        held.setdefault(process_of(device), set()).add(index[0].indices(global_batch)[:2])
    return {process: HostRows(global_batch, tuple(sorted({r for a, b in ranges for r in range(a, b)})))
            for process, ranges in sorted(held.items())}


def make_global_batch(
    local_batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ('data', 'fsdp'),
    rows: HostRows | None = None,
) -> dict[str, jax.Array]:
    """Per-process batches -> global arrays sharded on the leading dim over `batch_axes`.

    Axes of `batch_axes` that the mesh does not have are skipped. Without `rows` the global batch is inferred by
    JAX (the concatenation of the processes' disjoint batches); with `rows` (from :func:`host_rows`) the local
    batch holds those rows of the global batch and every local device takes its shard from them, which also
    works when processes share rows.

    Raises:
      ValueError: no batch axis in the mesh, or a batch that does not divide
        evenly over the batch axes.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f'None of the batch axes {batch_axes} is in the mesh axes {mesh.axis_names}.')
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    n_shards = math.prod(mesh.shape[a] for a in axes)
    # Devices along the batch axes that live on this process: the local batch splits over them.
    local_devices = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if rows is not None:
            if value.shape[0] != rows.size:
                raise ValueError(f'Batch field {key!r}: {value.shape[0]} rows, expected rows {rows} of the global '
                                 f'batch of {rows.global_batch}.')
            out[key] = jax.make_array_from_callback(
                (rows.global_batch, *value.shape[1:]), sharding,
                lambda index, value=value: value[_local_rows(index, rows)])
            continue
        global_rows = value.shape[0] * jax.process_count()
        if value.shape[0] == 0 or global_rows % n_shards:
            raise ValueError(
                f'Batch field {key!r}: {value.shape[0]} rows per process x {jax.process_count()} processes '
                f'does not divide over {n_shards} shards of mesh axes {axes} ({len(local_devices)} local devices).')
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _local_rows(index: tuple[slice, ...], rows: HostRows) -> tuple[slice, ...]:
    """A device's index into the global batch -> the same rows of this process's local batch."""
    start, stop, _ = index[0].indices(rows.global_batch)
    return (rows.local_slice(start, stop), *index[1:])


# -------------------------------------------------------------------- Orbax
def iterator_save_args(it: grain.DatasetIterator) -> Any:
    """Orbax args saving the iterator's position; use as an item of ocp.args.Composite.

    Example::

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=iterator_save_args(it)))
    """
    return grain.checkpoint.CheckpointSave(item=it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
    """Orbax args restoring a position into `it` (a fresh iterator of the same config).

    Example::

      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=iterator_restore_args(it)))
      it = restored['data']
    """
    return grain.checkpoint.CheckpointRestore(item=it)
