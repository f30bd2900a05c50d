"""Colour palette: k-means over pixels, and the pixel <-> token maps of iGPT.

iGPT (paper section 3.2) turns every pixel into one token: the index of the
nearest of k colours (k = 512 for RGB), found by k-means over (R, G, B) values
scaled to [-1, 1]. Decoding maps a token back to ``rint(127.5 * (c + 1))``.

Everything heavy is jitted JAX and works on fixed-size chunks, so a million
pixels against 512 centres never materialises a [n, k] matrix:

* :meth:`Palette.fit` - k-means++ initialisation, then Lloyd iterations until
  the inertia stops improving (deterministic given the seed).
* :meth:`Palette.encode` - nearest centre by squared distance, ties resolved
  like ``argmin`` (lowest index).
* :meth:`Palette.lookup_table` / :meth:`Palette.encode_lut` - the same map
  precomputed for every possible uint8 colour (2**24 for RGB, 256 for grey),
  so the input pipeline encodes a batch with one numpy gather.

Grayscale palettes have one channel; ``k`` may not exceed the number of
distinct grey levels in the sample (a larger k would duplicate centres).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

# Pixels per chunk in the jitted nearest-centre search. The search loops over
# centres keeping a running minimum per pixel (a [chunk] vector): on CPU this is
# ~20x faster than materialising [chunk, k] distances and calling argmin.
_CHUNK = 32768
_UNROLL = 32
# Lookup tables by palette content: several iterators over one palette (train,
# validation, test) build the 32 MiB RGB table once. At most a few are kept.
_LUT_CACHE: dict[bytes, np.ndarray] = {}
_LUT_CACHE_SIZE = 4


def to_unit(pixels: np.ndarray | jax.Array) -> Any:
    """Scales uint8 pixel values to float32 in [-1, 1] (``x / 127.5 - 1``)."""
    xp = jnp if isinstance(pixels, jax.Array) else np
    return xp.asarray(pixels, dtype=xp.float32) / xp.float32(127.5) - xp.float32(1.0)


def _nearest(x: jax.Array, centres: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centre of each column of x.

    Args:
      x: float32 [C, m], pixels in [-1, 1], channel-major.
      centres: float32 [k, C].

    Returns:
      (int32 [m] index of the nearest centre, float32 [m] its squared distance).
      The distance is ``sum_ch (x[ch] - c[ch])**2`` summed in channel order, and
      a centre replaces the current best only if strictly closer, so ties go to
      the lowest index exactly like ``argmin``.
    """
    k, c = centres.shape
    m = x.shape[1]

    def body(j, state):
        best_d, best_i = state
        cj = centres[j]
        d = None
        for ch in range(c):
            diff = x[ch] - cj[ch]
            d = diff * diff if d is None else d + diff * diff
        better = d < best_d
        return jnp.where(better, d, best_d), jnp.where(better, j, best_i)

    init = (jnp.full((m,), jnp.inf, jnp.float32), jnp.zeros((m,), jnp.int32))
    best_d, best_i = jax.lax.fori_loop(0, k, body, init, unroll=min(_UNROLL, k))
    return best_i, best_d


@jax.jit
def _nearest_chunks(pixels: jax.Array, centres: jax.Array) -> jax.Array:
    """Nearest centre of uint8 pixels [m * _CHUNK, C] -> int32 [m * _CHUNK]."""
    c = centres.shape[-1]
    chunks = pixels.reshape(-1, _CHUNK, c).transpose(0, 2, 1)  # [m, C, _CHUNK]
    return jax.lax.map(lambda ch: _nearest(to_unit(ch), centres)[0], chunks).reshape(-1)


@functools.partial(jax.jit, static_argnames=('k', 'max_iters'))
def _kmeans(
    x: jax.Array, w: jax.Array, key: jax.Array, *, k: int, max_iters: int, tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """k-means++ init, then Lloyd iterations.

    Args:
      x: float32 [n, C] points (n a multiple of _CHUNK, rows in random order).
      w: float32 [n] weights, 1 for real points and 0 for padding.
      key: PRNG key for the initialisation.
      k: number of centres.
      max_iters: maximum Lloyd iterations.
      tol: stop when the relative improvement of the inertia is below this.

    Returns:
      (centres [k, C], mean squared distance of the final assignment, iterations).
      Empty clusters keep their previous centre.
    """
    n, c = x.shape
    n_init = min(n, 4 * _CHUNK)  # k-means++ on the first 131k points (x is shuffled).
    xi, wi = x[:n_init], w[:n_init]

    # ---- k-means++: each new centre drawn with probability proportional to D^2.
    def init_step(i, carry):
        centres, min_d2, key = carry
        key, sub = jax.random.split(key)
        cum = jnp.cumsum(min_d2)
        u = jax.random.uniform(sub, (), dtype=jnp.float32) * cum[-1]
        j = jnp.minimum(jnp.searchsorted(cum, u, side='right'), n_init - 1)
        new = xi[j]
        centres = centres.at[i].set(new)
        min_d2 = jnp.minimum(min_d2, jnp.sum((xi - new) ** 2, axis=-1) * wi)
        return centres, min_d2, key

    key, sub = jax.random.split(key)
    first = xi[jax.random.randint(sub, (), 0, jnp.maximum(jnp.sum(wi > 0), 1))]
    centres0 = jnp.zeros((k, c), jnp.float32).at[0].set(first)
    min_d2 = jnp.sum((xi - first) ** 2, axis=-1) * wi
    centres0, _, _ = jax.lax.fori_loop(1, k, init_step, (centres0, min_d2, key))

    # ---- Lloyd iterations over chunks: assignment, then mean of each cluster.
    chunks = (x.reshape(-1, _CHUNK, c), w.reshape(-1, _CHUNK))
    total_w = jnp.sum(w)

    def assign_and_sum(centres):
        def body(acc, chunk_w):
            chunk, cw = chunk_w
            sums, counts, inertia = acc
            idx, dmin = _nearest(chunk.T, centres)
            sums = sums.at[idx].add(chunk * cw[:, None])
            counts = counts.at[idx].add(cw)
            return (sums, counts, inertia + jnp.sum(dmin * cw)), None

        init = (jnp.zeros((k, c), jnp.float32), jnp.zeros((k,), jnp.float32), jnp.float32(0.0))
        (sums, counts, inertia), _ = jax.lax.scan(body, init, chunks)
        return sums, counts, inertia / total_w

    def cond(state):
        _, prev, cur, it = state
        improving = (prev - cur) > tol * jnp.maximum(cur, 1e-12)
        return jnp.logical_and(it < max_iters, jnp.logical_or(it < 2, improving))

    def step(state):
        centres, _, cur, it = state
        sums, counts, inertia = assign_and_sum(centres)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        centres = jnp.where(counts[:, None] > 0, means, centres)
        return centres, cur, inertia, it + 1

    state = (centres0, jnp.float32(jnp.inf), jnp.float32(jnp.inf), jnp.int32(0))
    centres, _, _, iters = jax.lax.while_loop(cond, step, state)
    _, _, inertia = assign_and_sum(centres)
    return centres, inertia, iters


class Palette:
    """k colours in [-1, 1]; maps uint8 images to token ids and back.

    Attributes:
      centres: float32 [k, C] in [-1, 1], C = 3 (RGB) or 1 (grayscale).
    """

    def __init__(self, centres: np.ndarray):
        centres = np.asarray(centres, dtype=np.float32)
        if centres.ndim != 2 or centres.shape[1] not in (1, 3) or centres.shape[0] < 1:
            raise ValueError(f'Palette centres must have shape [k, 1] or [k, 3], got {centres.shape}.')
        if not np.all(np.isfinite(centres)):
            raise ValueError('Palette centres contain NaN or Inf.')
        self.centres = centres
        self._lut: np.ndarray | None = None

    # ------------------------------------------------------------------ basics
    @property
    def k(self) -> int:
        """Number of colours (the model's vocabulary)."""
        return int(self.centres.shape[0])

    @property
    def channels(self) -> int:
        """Channels per colour: 3 (RGB) or 1 (grayscale)."""
        return int(self.centres.shape[1])

    @property
    def colours(self) -> np.ndarray:
        """The centres as uint8 colours [k, C]: ``rint(127.5 * (c + 1))``."""
        return np.clip(np.rint(127.5 * (self.centres.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)

    def check_shape(self, k: int, channels: int, *, what: str = 'palette') -> None:
        """Raises ValueError unless the palette is [k, channels].

        Args:
          k: expected number of colours (config ``n_colors``).
          channels: expected channels (config ``channels``).
          what: a description for the message (dataset, path).
        """
        if (self.k, self.channels) != (int(k), int(channels)):
            raise ValueError(
                f'{what}: palette has shape {tuple(self.centres.shape)}, but the config expects '
                f'({k}, {channels}) (n_colors={k}, channels={channels}). Use a palette fitted for this '
                'config, or set palette_path=None to fit one.'
            )

    # --------------------------------------------------------------------- fit
    @classmethod
    def fit(
        cls,
        pixels_or_images: np.ndarray,
        k: int = 512,
        seed: int = 0,
        sample_pixels: int | None = 1_000_000,
        *,
        max_iters: int = 100,
        tol: float = 1e-4,
    ) -> Palette:
        """Fits k colours by k-means on a random sample of pixels.

        Args:
          pixels_or_images: uint8 array whose last axis is the channel axis
            (C = 1 or 3): pixels [n, C] or images [..., H, W, C].
          k: number of colours.
          seed: seed for the pixel sample and the k-means++ initialisation.
          sample_pixels: pixels drawn (without replacement) for the fit; None or a
            number >= the available pixels uses all of them.
          max_iters: maximum Lloyd iterations.
          tol: stop when the relative improvement of the inertia is below this.

        Returns:
          The fitted palette; centres sorted by mean intensity (for readability).

        Raises:
          ValueError: bad dtype/shape, or k larger than the distinct colours.
        """
        arr = np.asarray(pixels_or_images)
        if arr.dtype != np.uint8:
            raise ValueError(f'Palette.fit expects uint8 pixels, got {arr.dtype}.')
        if arr.ndim < 2 or arr.shape[-1] not in (1, 3):
            raise ValueError(f'Palette.fit expects [..., C] with C in (1, 3), got shape {arr.shape}.')
        c = arr.shape[-1]
        pix = arr.reshape(-1, c)
        rng = np.random.default_rng(seed)
        if sample_pixels is not None and sample_pixels < len(pix):
            pix = pix[np.sort(rng.choice(len(pix), size=int(sample_pixels), replace=False))]
        pix = pix[rng.permutation(len(pix))]
        n = len(pix)
        distinct = len(np.unique(pack_pixels(pix)))
        if k > distinct:
            kind = 'grey levels' if c == 1 else 'colours'
            raise ValueError(
                f'Cannot fit a palette of k={k} colours: the {n} sampled pixels have only {distinct} '
                f'distinct {kind}. Set n_colors <= {distinct}.'
            )
        # Pad to a multiple of the chunk with weight-0 rows.
        n_pad = math.ceil(n / _CHUNK) * _CHUNK
        x = np.zeros((n_pad, c), np.float32)
        x[:n] = to_unit(pix)
        w = (np.arange(n_pad) < n).astype(np.float32)
        t0 = time.time()
        centres, inertia, iters = _kmeans(
            jnp.asarray(x), jnp.asarray(w), jax.random.key(seed),
            k=int(k), max_iters=int(max_iters), tol=float(tol),
        )
        centres = np.asarray(centres)
        logging.info(
            'Palette.fit: k=%d C=%d on %d pixels, %d Lloyd iterations, inertia %.6f, %.1fs',
            k, c, n, int(iters), float(inertia), time.time() - t0,
        )
        order = np.lexsort((centres @ np.arange(1, c + 1), centres.mean(-1)))
        return cls(centres[order])

    # ------------------------------------------------------------ encode/decode
    def encode(self, images: np.ndarray) -> np.ndarray:
        """Nearest centre (squared distance in [-1, 1] units) of every pixel.

        Args:
          images: uint8 [..., H, W, C] (any leading shape; the last axis is C).

        Returns:
          int32 [..., H, W] token ids; ties go to the lowest index like argmin.
        """
        images = self._check_images(images)
        flat = images.reshape(-1, self.channels)
        n = len(flat)
        if n == 0:
            return np.zeros(images.shape[:-1], np.int32)
        # Bucket sizes to powers of two chunks: few distinct shapes, few compiles.
        m = 1 << max(0, math.ceil(math.log2(math.ceil(n / _CHUNK))))
        padded = np.zeros((m * _CHUNK, self.channels), np.uint8)
        padded[:n] = flat
        ids = np.asarray(_nearest_chunks(jnp.asarray(padded), jnp.asarray(self.centres)))
        return ids[:n].reshape(images.shape[:-1])

    def lookup_table(self) -> np.ndarray:
        """Token id of every possible uint8 colour, computed once by :meth:`encode`.

        Returns:
          int16 [2**24] for RGB (index ``(r << 16) | (g << 8) | b``) or [256] for
          grayscale. Equal to :meth:`encode` by construction.
        """
        if self._lut is None:
            key = hashlib.sha1(self.centres.tobytes() + bytes([self.channels])).digest()
            if key in _LUT_CACHE:
                self._lut = _LUT_CACHE[key]
                return self._lut
            t0 = time.time()
            if self.channels == 1:
                allc = np.arange(256, dtype=np.uint8)[:, None]
            else:
                v = np.arange(1 << 24, dtype=np.uint32)
                allc = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8)
            dtype = np.int16 if self.k <= np.iinfo(np.int16).max else np.int32
            self._lut = self.encode(allc).astype(dtype)
            self._lut.setflags(write=False)
            while len(_LUT_CACHE) >= _LUT_CACHE_SIZE:
                _LUT_CACHE.pop(next(iter(_LUT_CACHE)))
            _LUT_CACHE[key] = self._lut
            logging.info('Palette lookup table (%d entries) built in %.1fs', len(self._lut), time.time() - t0)
        return self._lut

    def encode_lut(self, images: np.ndarray) -> np.ndarray:
        """Same result as :meth:`encode`, by a gather from :meth:`lookup_table`.

        Args:
          images: uint8 [..., H, W, C].

        Returns:
          int32 [..., H, W].
        """
        images = self._check_images(images)
        return self.lookup_table()[pack_pixels(images)].astype(np.int32)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [...] -> uint8 colours [..., C] via ``rint(127.5 * (c + 1))``."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.k):
            raise ValueError(f'Token ids must be in [0, {self.k}), got range [{ids.min()}, {ids.max()}].')
        return self.colours[ids]

    def reconstruction_error(self, images: np.ndarray, units: str = 'unit') -> float:
        """Mean squared error of decode(encode(images)) against the images.

        Args:
          images: uint8 [..., H, W, C].
          units: 'unit' - in the [-1, 1] scale of the centres (x / 127.5 - 1 against
            the centre itself); 'uint8' - between the uint8 image and the decoded
            uint8 image, in grey levels squared.

        Returns:
          The mean over pixels and channels.
        """
        images = self._check_images(images)
        ids = self.encode_lut(images) if self._lut is not None else self.encode(images)
        if units == 'unit':
            err = to_unit(images) - self.centres[ids]
        elif units == 'uint8':
            err = images.astype(np.float64) - self.decode(ids)
        else:
            raise ValueError(f"units must be 'unit' or 'uint8', got {units!r}")
        return float(np.mean(np.square(err, dtype=np.float64)))

    # ---------------------------------------------------------------- storage
    def save(self, path: str | epath.PathLike) -> None:
        """Writes the centres as a .npy file (atomically: temp file, then rename)."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, self.centres)
        tmp = path.parent / f'.{path.name}.tmp-{np.random.default_rng().integers(1 << 62)}'
        tmp.write_bytes(buf.getvalue())
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | epath.PathLike) -> Palette:
        """Reads a palette written by :meth:`save` (float32 [k, C] .npy)."""
        path = epath.Path(path)
        try:
            centres = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(f'Cannot read palette {path}: {e}') from e
        try:
            return cls(centres)
        except ValueError as e:
            raise ValueError(f'Palette file {path}: {e}') from e

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f'Expected uint8 images, got {images.dtype}.')
        if images.ndim < 1 or images.shape[-1] != self.channels:
            raise ValueError(
                f'Expected images [..., {self.channels}] for a {self.channels}-channel palette, '
                f'got shape {images.shape}.'
            )
        return images

    def __repr__(self) -> str:
        return f'Palette(k={self.k}, channels={self.channels})'


def pack_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., C] -> int index [...] into :meth:`Palette.lookup_table`: the pixel itself (C=1) or r<<16|g<<8|b."""
    if pixels.shape[-1] == 1:
        return pixels[..., 0].astype(np.intp)
    p = pixels.astype(np.int32)
    return (p[..., 0] << 16) | (p[..., 1] << 8) | p[..., 2]
