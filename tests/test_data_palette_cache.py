"""palette_cache: a config's palette is fitted once on its dataset, saved next to it, and loaded from then on."""

import os

import numpy as np
import pytest
from absl import flags

from igpt_jax.data import palette_cache
from igpt_jax.data.palette import Palette

flags.FLAGS.mark_as_parsed()




def test_the_default_palette_is_saved_next_to_the_dataset_and_loaded(digits_cfg, digits_data_dir):
    path = palette_cache.default_palette_path(digits_cfg)
    assert path == os.path.join(digits_data_dir, 'digits', 'palette_k16_c1_r8_s0.npy') and os.path.exists(path)
    palette = palette_cache.load_or_fit_palette(digits_cfg)
    np.testing.assert_array_equal(palette.centres, Palette.load(path).centres)
    assert (palette.k, palette.channels) == (16, 1)


def test_a_fit_is_deterministic_and_saved_where_palette_path_says(digits_cfg, tmp_path):
    digits_cfg.palette_path = str(tmp_path / 'mine.npy')
    fitted = palette_cache.load_or_fit_palette(digits_cfg)  # no file there yet: fitted on the digits
    assert os.path.exists(digits_cfg.palette_path)
    np.testing.assert_array_equal(fitted.centres, Palette.load(palette_cache.default_palette_path(digits_cfg)).centres)


def test_a_saved_palette_of_another_shape_is_refused(digits_cfg, tmp_path):
    digits_cfg.palette_path = str(tmp_path / 'small.npy')
    Palette(np.linspace(-1, 1, 4, dtype=np.float32)[:, None]).save(digits_cfg.palette_path)
    with pytest.raises(ValueError, match='small.npy'):
        palette_cache.load_or_fit_palette(digits_cfg)


def test_sample_images_are_random_training_images_at_the_input_resolution(digits_cfg):
    a = palette_cache.sample_images(digits_cfg, 64 * 40, seed=1)
    assert a.shape == (160, 8, 8, 1) and a.dtype == np.uint8  # ~4x the pixels asked for
    np.testing.assert_array_equal(a, palette_cache.sample_images(digits_cfg, 64 * 40, seed=1))
    assert not np.array_equal(a, palette_cache.sample_images(digits_cfg, 64 * 40, seed=2))
