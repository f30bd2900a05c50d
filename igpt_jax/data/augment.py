"""Per-example image transforms: resize, and the augmentations of paper 3.1.

All functions take and return uint8 images [H, W, C] (C = 1 or 3) and draw
randomness only from an explicit ``np.random.Generator``, so the result is a
pure function of (image, generator state). Resizing uses Pillow's antialiased
filters (area averaging when shrinking, bilinear when enlarging).

Styles (``config.data.augment``):
  * ``'none'``: resize to the input resolution (centre square crop first when
    the image is not square), in training and evaluation alike.
  * ``'cifar'``: as ``'none'``, then in training a reflection pad of ``pad``
    pixels, a random crop back to the resolution and a random horizontal flip
    (Wide ResNet style).
  * ``'shift'``: the ``'cifar'`` crop without the flip: a random translation by
    up to ``pad`` pixels, for images whose mirror image is another class or
    none of the set (digits).
  * ``'imagenet'``: in training, rescale so the shorter side is uniform in
    ``resize_range`` (256..384), take a random ``crop`` (224) square, resize it
    to the resolution. In evaluation, rescale the shorter side to ``crop``, take
    the centre crop, resize to the resolution. Both are done as one resize of
    the corresponding box of the original image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

STYLES = ('none', 'cifar', 'shift', 'imagenet')


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(pil, dtype=np.uint8)
    return out[..., None] if channels == 1 else out


def resize_box(
    image: np.ndarray,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resizes (the region `box` of) an image to `size`.

    Args:
      image: uint8 [H, W, C].
      size: output (height, width).
      box: optional source region (left, upper, right, lower) in pixels, floats
        allowed; default the whole image.

    Returns:
      uint8 [height, width, C].
    """
    h, w, c = image.shape
    out_h, out_w = size
    if box is None:
        if (h, w) == (out_h, out_w):
            return image
        box = (0.0, 0.0, float(w), float(h))
    shrink = (box[2] - box[0]) > out_w or (box[3] - box[1]) > out_h
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    pil = _to_pil(image).resize((out_w, out_h), resample=resample, box=tuple(float(b) for b in box))
    return _from_pil(pil, c)


def resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resizes to resolution x resolution; a non-square image is centre-cropped to a square first."""
    h, w, _ = image.shape
    if h == w:
        return resize_box(image, (resolution, resolution))
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize_box(image, (resolution, resolution), (left, top, left + s, top + s))


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices into [0, n) of positions `idx` under reflection padding (numpy 'reflect')."""
    idx = np.abs(idx)
    return np.where(idx >= n, 2 * (n - 1) - idx, idx)


def cifar_augment(image: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Reflection pad, random crop back to the same size, random horizontal flip (unless ``flip=False``).

    Equal to ``np.pad(image, pad, mode='reflect')`` followed by the crop and the
    flip, done as one gather.

    Args:
      image: uint8 [H, W, C] with H, W > pad.
      rng: the random generator (draws: top, left, flip).
      pad: pixels of reflection padding on each side.
      flip: whether to flip horizontally with probability 1/2 (no draw is made when False).

    Returns:
      uint8 [H, W, C].
    """
    h, w, _ = image.shape
    if pad >= min(h, w):
        raise ValueError(f'Reflection pad {pad} needs images larger than {pad}, got {h}x{w}.')
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    flip = flip and rng.random() < 0.5
    rows = _reflect(np.arange(top - pad, top - pad + h), h)
    cols = _reflect(np.arange(left - pad, left - pad + w), w)
    if flip:
        cols = cols[::-1]
    return image.take(rows, axis=0).take(cols, axis=1)


def imagenet_train(
    image: np.ndarray,
    rng: np.random.Generator,
    resolution: int,
    resize_range: tuple[int, int] = (256, 384),
    crop: int = 224,
) -> np.ndarray:
    """Random shorter side in `resize_range`, random `crop` square, resized to `resolution`.

    The crop is mapped back to a box of the original image and resized once.
    """
    h, w, _ = image.shape
    short = int(rng.integers(resize_range[0], resize_range[1] + 1))
    scale = short / min(h, w)
    sh, sw = max(crop, round(h * scale)), max(crop, round(w * scale))
    top = int(rng.integers(0, sh - crop + 1))
    left = int(rng.integers(0, sw - crop + 1))
    fy, fx = h / sh, w / sw
    box = (left * fx, top * fy, (left + crop) * fx, (top + crop) * fy)
    return resize_box(image, (resolution, resolution), box)


def imagenet_eval(image: np.ndarray, resolution: int, crop: int = 224) -> np.ndarray:
    """Shorter side to `crop`, centre `crop` square, resized to `resolution`.

    Equals one resize of the centred square of side min(H, W).
    """
    del crop  # the centre crop of the rescaled image is the centred square.
    return resize(image, resolution)


def train_transform(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    style: str,
    resolution: int,
    cifar_pad: int = 4,
    imagenet_resize_range: tuple[int, int] = (256, 384),
    imagenet_crop: int = 224,
) -> np.ndarray:
    """The training transform of `style`; returns uint8 [resolution, resolution, C]."""
    if style == 'none':
        return resize(image, resolution)
    if style == 'cifar':
        return cifar_augment(resize(image, resolution), rng, cifar_pad)
    if style == 'shift':
        return cifar_augment(resize(image, resolution), rng, cifar_pad, flip=False)
    if style == 'imagenet':
        return imagenet_train(image, rng, resolution, tuple(imagenet_resize_range), imagenet_crop)
    raise ValueError(f'Unknown augmentation {style!r}; expected one of {STYLES}.')


def eval_transform(image: np.ndarray, *, style: str, resolution: int, imagenet_crop: int = 224) -> np.ndarray:
    """The evaluation transform of `style` (no randomness); returns [resolution, resolution, C]."""
    if style in ('none', 'cifar', 'shift'):
        return resize(image, resolution)
    if style == 'imagenet':
        return imagenet_eval(image, resolution, imagenet_crop)
    raise ValueError(f'Unknown augmentation {style!r}; expected one of {STYLES}.')
