"""Palette: k-means fit, nearest-centre encode, decode, storage."""

import numpy as np
import pytest

from igpt_jax.data.palette import Palette, to_unit


def brute_force_ids(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Reference: argmin over all squared distances, in float32 numpy."""
    x = pixels.reshape(-1, pixels.shape[-1]).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    d = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return d.argmin(-1).reshape(pixels.shape[:-1])


@pytest.mark.parametrize('channels', [3, 1])
def test_encode_matches_brute_force(channels):
    rng = np.random.default_rng(0)
    centres = rng.uniform(-1, 1, (37, channels)).astype(np.float32)
    images = rng.integers(0, 256, (3, 5, 17, 19, channels), dtype=np.uint8)
    pal = Palette(centres)
    ids = pal.encode(images)
    assert ids.shape == (3, 5, 17, 19) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, brute_force_ids(images, centres))
    np.testing.assert_array_equal(pal.encode_lut(images), ids)


def test_ties_go_to_lowest_index_like_argmin():
    # Centres 1 and 3 are the same colour; 0 and 2 are equidistant from grey 127.5±.
    c = np.array([[-0.5, 0, 0], [0.2, 0.2, 0.2], [0.5, 0, 0], [0.2, 0.2, 0.2]], np.float32)
    pal = Palette(c)
    colours = np.array([[[[153, 153, 153], [63, 127, 127], [191, 127, 127]]]], np.uint8)
    ids = pal.encode(colours)[0, 0]
    assert ids[0] == 1  # exact duplicate of centre 1 and 3 -> 1
    np.testing.assert_array_equal(ids, brute_force_ids(colours, c)[0, 0])
    # A pixel exactly between centres 0 and 2 (x = 0) in channel 0.
    mid = Palette(np.array([[-0.5], [0.5]], np.float32))
    pix = np.array([[127]], np.uint8)[..., None]  # 127/127.5 - 1 = -0.0039: nearer to 0
    assert mid.encode(pix).item() == brute_force_ids(pix, mid.centres).item() == 0
    twin = Palette(np.array([[0.1], [0.1]], np.float32))
    assert twin.encode(np.full((4, 4, 1), 200, np.uint8)).max() == 0


def test_decode_and_round_trip():
    rng = np.random.default_rng(1)
    colours = rng.choice(256, size=(50, 3), replace=False).astype(np.uint8)  # distinct colours
    pal = Palette(to_unit(colours))
    np.testing.assert_array_equal(pal.colours, colours)  # rint(127.5 * (c + 1)) recovers them
    ids = rng.integers(0, 50, (2, 8, 8))
    images = pal.decode(ids)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(pal.encode(images), ids)
    assert pal.reconstruction_error(images) == 0.0
    assert pal.reconstruction_error(images, units='uint8') == 0.0
    with pytest.raises(ValueError, match=r'\[0, 50\)'):
        pal.decode(np.array([50]))


def test_decode_formula():
    pal = Palette(np.array([[-1, 1, 0], [0.0039, -0.9961, 0.5]], np.float32))
    expected = np.rint(127.5 * (pal.centres.astype(np.float64) + 1)).astype(np.uint8)
    np.testing.assert_array_equal(pal.decode(np.array([0, 1])), expected)
    assert pal.decode(np.array([0]))[0].tolist() == [0, 255, 128]


def test_reconstruction_error_value():
    rng = np.random.default_rng(2)
    pal = Palette(rng.uniform(-1, 1, (16, 3)).astype(np.float32))
    images = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    ids = brute_force_ids(images, pal.centres)
    expected = np.mean((to_unit(images).astype(np.float64) - pal.centres[ids]) ** 2)
    assert pal.reconstruction_error(images) == pytest.approx(expected, rel=1e-6)
    expected8 = np.mean((images.astype(np.float64) - pal.colours[ids]) ** 2)
    assert pal.reconstruction_error(images, units='uint8') == pytest.approx(expected8, rel=1e-9)


def test_fit_recovers_clusters_and_is_deterministic():
    rng = np.random.default_rng(3)
    truth = rng.choice(np.arange(16, 240, 28), size=(6, 3)).astype(np.int64)
    truth = np.unique(truth, axis=0)
    k = len(truth)
    pixels = truth[rng.integers(0, k, 30_000)] + rng.integers(-3, 4, (30_000, 3))
    pixels = pixels.astype(np.uint8)
    a = Palette.fit(pixels, k=k, seed=0, sample_pixels=20_000)
    b = Palette.fit(pixels, k=k, seed=0, sample_pixels=20_000)
    np.testing.assert_array_equal(a.centres, b.centres)
    assert a.k == k and a.channels == 3
    # Every true colour has a centre within 1.5 grey levels, and the error is ~ the noise.
    d = np.abs(a.colours[None].astype(int) - truth[:, None]).max(-1).min(-1)
    assert d.max() <= 1.5
    noise_var = np.mean(np.arange(-3, 4) ** 2) / 127.5**2
    assert a.reconstruction_error(pixels.reshape(100, 300, 3)) == pytest.approx(noise_var, rel=0.1)


def test_fit_grayscale_levels():
    rng = np.random.default_rng(4)
    levels = np.array([0, 16, 32, 96, 200, 255], np.uint8)
    images = levels[rng.integers(0, 6, (40, 8, 8))][..., None]
    pal = Palette.fit(images, k=6, seed=1, sample_pixels=None)
    assert pal.channels == 1
    np.testing.assert_array_equal(np.sort(pal.colours[:, 0]), levels)
    assert pal.reconstruction_error(images, units='uint8') == 0.0
    assert pal.reconstruction_error(images) < 1e-10  # centres are float32 cluster means.
    with pytest.raises(ValueError, match=r'k=7.*only 6 distinct grey levels.*n_colors <= 6'):
        Palette.fit(images, k=7, seed=1)


def test_save_load_and_shape_check(tmp_path):
    pal = Palette(np.random.default_rng(5).uniform(-1, 1, (12, 3)).astype(np.float32))
    path = tmp_path / 'sub' / 'palette.npy'
    pal.save(path)
    back = Palette.load(path)
    np.testing.assert_array_equal(back.centres, pal.centres)
    back.check_shape(12, 3)
    with pytest.raises(ValueError, match=r'shape \(12, 3\).*expects \(512, 3\)'):
        back.check_shape(512, 3, what='dataset x')
    with pytest.raises(ValueError, match=r'expects \(12, 1\)'):
        back.check_shape(12, 1)
    np.save(tmp_path / 'bad.npy', np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match='bad.npy'):
        Palette.load(tmp_path / 'bad.npy')


def test_input_checks():
    pal = Palette(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match='uint8'):
        pal.encode(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r'\[\.\.\., 3\]'):
        pal.encode(np.zeros((2, 2, 1), np.uint8))
