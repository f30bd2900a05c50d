"""The Grain transforms of the input pipeline, each a step of `iterators.make_iterator`'s chain.

    batch of record positions -> `SliceRows` (this process's rows of a global batch)
      -> `ReadBatch` (one batched read; training augmentation or evaluation resize per example, `Augment`)
      -> `PaletteTokens` (palette tokens in raster order) | `CodeTokens` (data.tokens='codes') | `ToUnit` ('raw')

Each transform is a picklable object (Grain worker processes get copies) and a pure function of its input and, for
the augmentation, of (seed, the example's position in the global example stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from igpt_jax.data import augment
from igpt_jax.data.palette import pack_pixels
from igpt_jax.data.records import ImageRecords, tokens_kind


@dataclasses.dataclass(frozen=True)
class Augment:
    """Per-example transform of config.data.augment: training (random) or evaluation."""

    style: str
    resolution: int
    cifar_pad: int
    resize_range: tuple[int, int]
    crop: int

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The random training augmentation of one uint8 image [H, W, C] -> [res, res, C]."""
        return augment.train_transform(
            image, rng, style=self.style, resolution=self.resolution, cifar_pad=self.cifar_pad,
            imagenet_resize_range=self.resize_range, imagenet_crop=self.crop)

    def eval(self, image: np.ndarray) -> np.ndarray:
        """The deterministic evaluation resize (and ImageNet centre crop) of one image."""
        return augment.eval_transform(image, style=self.style, resolution=self.resolution,
                                      imagenet_crop=self.crop)


def augment_for(data_cfg: ml_collections.ConfigDict) -> Augment | None:
    """config.data.augment as a transform (None for code grids, which are read as stored).

    Raises:
      ValueError: an unknown augmentation style.
    """
    if tokens_kind(data_cfg) == 'codes':
        return None  # code grids are read as stored
    if data_cfg.augment not in augment.STYLES:
        raise ValueError(f'augment must be one of {augment.STYLES}, got {data_cfg.augment!r}.')
    return Augment(data_cfg.augment, int(data_cfg.resolution), int(data_cfg.cifar_pad),
                   tuple(int(v) for v in data_cfg.imagenet_resize_range), int(data_cfg.imagenet_crop))


class ReadBatch(grain.transforms.MapWithIndex):
    """Batch of record positions -> batch of transformed examples (stacked arrays).

    Reads the records in one batched read, decodes them, and applies the training
    augmentation (each example with its own generator seeded by (seed, its position
    in the global example stream), so the augmentation does not depend on how the
    global batch is split between processes) or the evaluation resize.
    """

    def __init__(self, reader: ImageRecords, transform: Augment | None, train: bool, seed: int,
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


class SliceRows(grain.transforms.Map):
    """This process's rows of a global batch of record positions."""

    def __init__(self, rows: Sequence[int]):
        self.rows = np.asarray(rows, np.int64)

    def map(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions)[self.rows]


class ToUnit(grain.transforms.Map):
    """Batch of uint8 images -> float32 images in [-1, 1] (data.tokens='raw')."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, 'image': batch['image'].astype(np.float32) / np.float32(127.5) - np.float32(1.0)}


class CodeTokens(grain.transforms.Map):
    """Batch of stored code grids -> tokens in raster order (data.tokens='codes')."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = batch['image']  # [b, g, g, 1]
        return {'tokens': codes.reshape(codes.shape[0], -1).astype(np.int32), 'label': batch['label'],
                'mask': batch['mask'], 'index': batch['index']}


class PaletteTokens(grain.transforms.Map):
    """Batch of images -> palette tokens in raster order, via the palette's lookup table."""

    def __init__(self, lut: np.ndarray):
        self.lut = lut

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch['image']  # [b, res, res, C]
        tokens = self.lut[pack_pixels(images)].reshape(images.shape[0], -1).astype(np.int32)  # [b, res*res]
        return {'tokens': tokens, 'label': batch['label'], 'mask': batch['mask'], 'index': batch['index']}
