"""Per-example transforms: shapes, determinism under a seed, and exact geometry."""

import numpy as np
import pytest

from igpt_jax.data import augment


def _image(h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize('style', augment.STYLES)
@pytest.mark.parametrize('shape', [(32, 32, 3), (40, 56, 3), (28, 28, 1), (300, 200, 3)])
def test_shapes_and_determinism(style, shape):
    img = _image(*shape)
    a = augment.train_transform(img, np.random.default_rng(7), style=style, resolution=16)
    b = augment.train_transform(img, np.random.default_rng(7), style=style, resolution=16)
    assert a.shape == (16, 16, shape[-1]) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    e = augment.eval_transform(img, style=style, resolution=16)
    assert e.shape == (16, 16, shape[-1]) and e.dtype == np.uint8
    np.testing.assert_array_equal(e, augment.eval_transform(img, style=style, resolution=16))
    if style != 'none':  # random styles: some seed gives a different result.
        outs = {augment.train_transform(img, np.random.default_rng(s), style=style, resolution=16).tobytes()
                for s in range(8)}
        assert len(outs) > 1


def test_cifar_matches_pad_crop_flip_reference():
    img = _image(32, 32, 3, seed=1)
    for seed in range(20):
        out = augment.cifar_augment(img, np.random.default_rng(seed), pad=4)
        rng = np.random.default_rng(seed)
        top, left, flip = rng.integers(0, 9), rng.integers(0, 9), rng.random() < 0.5
        ref = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode='reflect')[top:top + 32, left:left + 32]
        if flip:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(out, ref)


def test_cifar_covers_all_offsets_and_flips():
    img = _image(32, 32, 1, seed=2)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode='reflect')
    outcomes = {}
    for top in range(9):
        for left in range(9):
            crop = padded[top:top + 32, left:left + 32]
            outcomes[np.ascontiguousarray(crop).tobytes()] = (top, left, False)
            outcomes[np.ascontiguousarray(crop[:, ::-1]).tobytes()] = (top, left, True)
    assert len(outcomes) == 9 * 9 * 2
    seen = [outcomes[augment.cifar_augment(img, np.random.default_rng(s)).tobytes()] for s in range(3000)]
    assert len(set(seen)) == 9 * 9 * 2  # every offset and flip occurs, nothing else does.


def test_shift_is_the_cifar_crop_without_the_flip():
    """'shift' (the demo's digits): every offset of the reflect-padded image occurs, never a mirror image."""
    img = _image(8, 8, 1, seed=3)
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='reflect')
    crops = {np.ascontiguousarray(padded[t:t + 8, l:l + 8]).tobytes(): (t, l) for t in range(3) for l in range(3)}
    seen = set()
    for s in range(300):
        out = augment.train_transform(img, np.random.default_rng(s), style='shift', resolution=8, cifar_pad=1)
        assert out.tobytes() in crops, f'seed {s}: not an unflipped crop'
        seen.add(crops[out.tobytes()])
        rng = np.random.default_rng(s)
        top, left = rng.integers(0, 3), rng.integers(0, 3)
        assert crops[out.tobytes()] == (top, left)  # the cifar draws of top and left, and no flip drawn
    assert len(seen) == 9
    np.testing.assert_array_equal(augment.eval_transform(img, style='shift', resolution=8), img)


def test_resize_is_identity_at_same_size_and_preserves_constant():
    img = _image(32, 32, 3)
    assert augment.resize(img, 32) is img
    const = np.full((50, 70, 3), 77, np.uint8)
    np.testing.assert_array_equal(augment.resize(const, 8), np.full((8, 8, 3), 77, np.uint8))
    # Area downsampling by 2 of a non-constant image = 2x2 means.
    img2 = _image(8, 8, 1, seed=3)
    expected = img2.reshape(4, 2, 4, 2, 1).astype(float).mean((1, 3))
    np.testing.assert_allclose(augment.resize(img2, 4), expected, atol=1.0)


def test_non_square_resize_centre_crops():
    img = np.zeros((20, 40, 1), np.uint8)
    img[:, 10:30] = 255  # the centred 20x20 square is white, the sides black.
    np.testing.assert_array_equal(augment.resize(img, 10), np.full((10, 10, 1), 255, np.uint8))
    np.testing.assert_array_equal(augment.imagenet_eval(img, 10), np.full((10, 10, 1), 255, np.uint8))


def test_imagenet_train_crop_lies_inside_the_image():
    # A 300x400 image: the random 224 crop at shorter side 256..384 covers 58%..88% of the short side.
    img = np.zeros((300, 400, 1), np.uint8)
    img[150:, :] = 255  # bottom half white
    means = [augment.imagenet_train(img, np.random.default_rng(s), 32).mean() / 255 for s in range(30)]
    assert 0.0 <= min(means) and max(means) <= 1.0 and np.std(means) > 0.02


def test_unknown_style():
    with pytest.raises(ValueError, match='bogus'):
        augment.train_transform(_image(8, 8, 3), np.random.default_rng(0), style='bogus', resolution=8)
