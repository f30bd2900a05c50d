r"""Input pipeline throughput: CIFAR-10 at 32x32, 512-colour palette, CIFAR augmentation, batch 128.

Usage:
  python bench/bench_pipeline.py [--data_dir=/tmp/tfds] [--steps=60] [--threads=0,2,4,8] [--workers=0,2]

Imports CIFAR-10 from shared/data/cifar10.npz into --data_dir if it is not
there, loads (or fits and saves) the 512-colour palette, then times the
training iterator (shuffle, decode, reflect-pad/crop/flip, tokenize, batch) for
each Grain setting and the evaluation iterator, and prints a markdown table of
images/s and tokens/s (tokens = 1024 palette ids per image).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/tfds', 'TFDS data_dir (CIFAR-10 imported if missing).')
_STEPS = flags.DEFINE_integer('steps', 60, 'Timed batches per setting (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed batches first (fills the prefetch buffer).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Batch size.')
_THREADS = flags.DEFINE_list('threads', ['0', '2', '4', '8'], 'Grain read threads to try.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'Grain worker processes to try.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timings per setting; the best is reported.')


def _time_iterator(make, steps: int, warmup: int, repeats: int) -> float:
    """Best-of-`repeats` seconds per batch."""
    best = float('inf')
    for _ in range(repeats):
        it = make()
        try:
            for _ in range(warmup):
                next(it)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            best = min(best, (time.perf_counter() - t0) / steps)
        finally:
            if hasattr(it, 'close'):
                it.close()
    return best


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from igpt_jax.data import augment, auto_import, iterators, palette_cache, records  # pylint: disable=g-import-not-at-top
    from igpt_jax.data.config import default_data_config  # pylint: disable=g-import-not-at-top

    tfds.display_progress_bar(False)
    cfg = default_data_config('cifar10')
    cfg.data_dir = _DATA_DIR.value
    bs = _BATCH.value
    t0 = time.perf_counter()
    auto_import.ensure_dataset(cfg)
    t_data = time.perf_counter() - t0
    path = palette_cache.default_palette_path(cfg)
    existed = os.path.exists(path)
    t0 = time.perf_counter()
    palette = palette_cache.load_or_fit_palette(cfg)
    t_palette = time.perf_counter() - t0
    t0 = time.perf_counter()
    palette.lookup_table()
    t_lut = time.perf_counter() - t0

    reader = records.image_records(cfg, 'test', 0, 1000)
    images = np.stack([augment.resize(reader[i]['image'], 32) for i in range(1000)])
    err = palette.reconstruction_error(images)
    err8 = palette.reconstruction_error(images, units='uint8')

    print(f'\nCIFAR-10 ({records.num_examples(cfg, "train")} train records), {os.cpu_count()} CPUs, '
          f'batch {bs}, {cfg.resolution}x{cfg.resolution}, {palette.k} colours, augment={cfg.augment}')
    print(f'dataset ready in {t_data:.1f}s; palette {"loaded" if existed else "fitted"} in {t_palette:.1f}s '
          f'({path}); lookup table {t_lut:.1f}s')
    print(f'palette reconstruction on 1000 test images: MSE {err:.6f} in [-1, 1] units, '
          f'RMSE {np.sqrt(err8):.2f} grey levels\n')
    print('| iterator | read threads | workers | images/s | tokens/s | ms/batch |')
    print('|---|---|---|---|---|---|')
    tokens_per_image = cfg.resolution ** 2
    for workers in (int(w) for w in _WORKERS.value):
        for threads in (int(t) for t in _THREADS.value):
            c = cfg.copy_and_resolve_references()
            c.read_threads, c.num_workers = threads, workers
            c.prefetch_buffer_size = max(2, 2 * threads)
            make = lambda c=c: iterators.make_iterator(c, 'train', batch_size=bs, train=True, seed=0, palette=palette)
            dt = _time_iterator(make, _STEPS.value, _WARMUP.value, _REPEATS.value)
            print(f'| train (shuffle+augment) | {threads} | {workers} | {bs / dt:,.0f} | '
                  f'{bs * tokens_per_image / dt:,.0f} | {dt * 1e3:.1f} |', flush=True)
    c = cfg.copy_and_resolve_references()
    c.read_threads, c.prefetch_buffer_size = 4, 8
    make = lambda: iterators.make_iterator(c, 'test', batch_size=bs, train=False, palette=palette)
    dt = _time_iterator(make, min(_STEPS.value, 10000 // bs - _WARMUP.value), _WARMUP.value, _REPEATS.value)
    print(f'| eval (in order, no augment) | 4 | 0 | {bs / dt:,.0f} | {bs * tokens_per_image / dt:,.0f} | '
          f'{dt * 1e3:.1f} |')


if __name__ == '__main__':
    app.run(main)
