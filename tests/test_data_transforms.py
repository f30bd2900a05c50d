"""transforms: each Grain step of the pipeline alone, on made-up records (no dataset)."""

import numpy as np
import pytest

from igpt_jax.data import transforms
from igpt_jax.data.config import default_data_config
from igpt_jax.data.palette import Palette


class FakeRecords:
    """What ReadBatch reads: `n` records, each image a gradient shifted by the record number; the last is padding
    (a zero image of the input resolution, as ImageRecords pads)."""

    def __init__(self, n: int = 10, size: int = 12, channels: int = 3, resolution: int = 8):
        self.n, self.size, self.channels, self.resolution = n, size, channels, resolution

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        grid = np.add.outer(np.arange(self.size), np.arange(self.size)) * 9 + 17 * i
        return np.repeat((grid % 256).astype(np.uint8)[..., None], self.channels, axis=-1)

    def _getitems(self, indices):
        pad = np.zeros((self.resolution, self.resolution, self.channels), np.uint8)
        return [{'image': self.image(i) if i < self.n - 1 else pad, 'label': np.int32(i % 3),
                 'index': np.int32(i if i < self.n - 1 else -1), 'mask': np.bool_(i < self.n - 1)} for i in indices]


def _augment(style: str = 'cifar', resolution: int = 8) -> transforms.Augment:
    cfg = default_data_config('digits')
    cfg.augment, cfg.resolution = style, resolution
    return transforms.augment_for(cfg)


def test_augment_for_the_config():
    cfg = default_data_config('digits')
    assert transforms.augment_for(cfg) == transforms.Augment(
        'none', 8, cfg.cifar_pad, tuple(cfg.imagenet_resize_range), cfg.imagenet_crop)
    cfg.tokens = 'codes'
    assert transforms.augment_for(cfg) is None  # code grids are read as stored
    cfg.tokens, cfg.augment = 'palette', 'flip'
    with pytest.raises(ValueError, match='augment must be one of'):
        transforms.augment_for(cfg)


def test_read_batch_augments_each_example_by_its_place_in_the_global_batch():
    reader, augment = FakeRecords(), _augment('cifar')
    positions = np.array([4, 0, 7, 2, 9, 1, 3, 5])  # one global batch of 8; position 9 is the padding record
    whole = transforms.ReadBatch(reader, augment, True, 11, range(8), 8).map_with_index(2, positions)
    # Two processes holding rows (0, 2, 4, 6) and (1, 3, 5, 7) of the same global batch read the same examples.
    for rows in ((0, 2, 4, 6), (1, 3, 5, 7)):
        mine = transforms.SliceRows(rows).map(positions)
        part = transforms.ReadBatch(reader, augment, True, 11, rows, 8).map_with_index(2, mine)
        for key in ('image', 'label', 'index', 'mask'):
            np.testing.assert_array_equal(part[key], whole[key][list(rows)])
    assert whole['image'].shape == (8, 8, 8, 3) and whole['image'].dtype == np.uint8
    np.testing.assert_array_equal(whole['mask'], positions != 9)
    assert not whole['image'][4].any()  # padding passes through unaugmented
    later = transforms.ReadBatch(reader, augment, True, 11, range(8), 8).map_with_index(3, positions)
    assert not np.array_equal(later['image'][:4], whole['image'][:4])  # the next step draws new crops and flips
    evaluated = transforms.ReadBatch(reader, augment, False, 11, range(8), 8).map_with_index(2, positions)
    for j, p in enumerate(positions[:4]):
        np.testing.assert_array_equal(evaluated['image'][j], augment.eval(reader.image(p)))


def test_positions_count_up_through_epochs():
    reader = FakeRecords()
    read = transforms.ReadBatch(reader, None, False, 0, range(3), 3)
    np.testing.assert_array_equal(read.map_with_index(0, np.array([1, 11, 21]))['label'], [1, 1, 1])


def test_palette_tokens_are_the_palette_encoding_in_raster_order():
    palette = Palette(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    batch = {'image': images, 'label': np.arange(2), 'mask': np.ones(2, bool), 'index': np.arange(2)}
    out = transforms.PaletteTokens(palette.lookup_table()).map(batch)
    assert sorted(out) == ['index', 'label', 'mask', 'tokens'] and out['tokens'].dtype == np.int32
    np.testing.assert_array_equal(out['tokens'], palette.encode(images).reshape(2, 25))


def test_codes_and_raw_pixels():
    codes = np.arange(18, dtype=np.int32).reshape(2, 3, 3, 1)
    batch = {'image': codes, 'label': np.arange(2), 'mask': np.ones(2, bool), 'index': np.arange(2)}
    np.testing.assert_array_equal(transforms.CodeTokens().map(batch)['tokens'], codes.reshape(2, 9))
    pixels = np.array([[[[0], [255]]]], np.uint8)
    raw = transforms.ToUnit().map({**batch, 'image': pixels})
    assert raw['image'].dtype == np.float32 and raw['image'].ravel().tolist() == [-1.0, 1.0]
