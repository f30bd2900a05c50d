"""Image grids users look at: completions and samples decoded through a palette (or a VQ-VAE's decoder), tiled into
one PNG; and the arrays behind them as .npy files, written locally or on gs://."""

from __future__ import annotations

import io
import math

import numpy as np
from etils import epath
from PIL import Image


def image_grid(images: np.ndarray, *, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Tiles uint8 images [rows, cols, H, W, C] into one uint8 image with `pad` pixels around every cell.

    Each image is first enlarged `scale` times (nearest neighbour). The result is
    [rows * (H*scale + pad) + pad, cols * (W*scale + pad) + pad, C].
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [rows, cols, H, W, C], got {images.dtype} {images.shape}")
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    rows, cols, h, w, c = images.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.uint8)
    for r in range(rows):
        for col in range(cols):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = images[r, col]
    return grid


def default_scale(resolution: int) -> int:
    """Enlarges small images (8x8 digits) so that a cell is at least 32 pixels wide."""
    return max(1, 32 // max(1, resolution))


def completion_panels(palette, originals: np.ndarray, samples: np.ndarray, *, resolution: int, given_rows: int,
                      hidden_value: int = 128) -> np.ndarray:
    """Rows of [original, the given rows (the rest grey), sample 1, ..., sample S] as uint8 images.

    Args:
      palette: a `igpt_jax.data.palette.Palette` (its `decode` maps ids to uint8 colours).
      originals: int [num_images, resolution**2] tokens of the original images.
      samples: int [num_images, samples_per_image, resolution**2] completions.
      resolution: image side.
      given_rows: rows given to the model.
      hidden_value: grey level shown where the model was given nothing.

    Returns:
      uint8 [num_images, 2 + samples_per_image, resolution, resolution, C].
    """
    n, s = samples.shape[:2]
    shape = (resolution, resolution)
    orig = palette.decode(np.asarray(originals).reshape(n, 1, *shape))  # [n, 1, H, W, C]
    given = orig.copy()
    given[:, :, given_rows:] = hidden_value
    samp = palette.decode(np.asarray(samples).reshape(n, s, *shape))
    return np.concatenate([orig, given, samp], axis=1)


def sample_panels(palette, samples: np.ndarray, *, resolution: int, columns: int | None = None) -> np.ndarray:
    """Unconditional samples [N, resolution**2] laid out in rows of `columns` (default ~sqrt(N)) images."""
    samples = np.asarray(samples)
    n = samples.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    images = palette.decode(samples.reshape(n, resolution, resolution))  # [N, H, W, C]
    blank = np.full((rows * columns - n,) + images.shape[1:], 255, np.uint8)
    return np.concatenate([images, blank]).reshape(rows, columns, *images.shape[1:])


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes uint8 [H, W, 1 or 3] as PNG."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"png_bytes expects uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | epath.PathLike, image: np.ndarray) -> epath.Path:
    """Writes uint8 [H, W, C] as a PNG file (local or gs://)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def save_npy(path: str | epath.PathLike, array: np.ndarray) -> epath.Path:
    """Writes an array as .npy (local or gs://)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    path.write_bytes(buf.getvalue())
    return path
