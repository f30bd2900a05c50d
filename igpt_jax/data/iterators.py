"""The input pipeline's iterators: TFDS records -> Grain -> palette tokens in raster order, and their Orbax state.

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

The pieces: `records` (splits and the record reader), `transforms` (the Grain steps), `palette_cache` (the palette),
`multihost` (this process's rows of each global batch).

Every element is a function of (seed, position), so the iterator's Grain state
(a position) restores exactly; :func:`iterator_save_args` and
:func:`iterator_restore_args` put it in an Orbax checkpoint next to the model.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import ml_collections

from igpt_jax.data import records, transforms
from igpt_jax.data.codes import check_codes_dataset
from igpt_jax.data.multihost import HostRows
from igpt_jax.data.palette import Palette
from igpt_jax.data.palette_cache import load_or_fit_palette


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
      rows: this process's rows of every global batch (:func:`multihost.host_rows`, what its devices hold), instead of
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
        own = range(shard_index * batch_size, (shard_index + 1) * batch_size)
        rows = HostRows(batch_size * shard_count, tuple(own))
    options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=train)
    builder = records.dataset_builder(data_cfg)
    _, lo, hi = records.split_bounds(data_cfg, split, builder)
    n = hi - lo
    if n == 0:
        raise ValueError(f'Dataset {data_cfg.name!r} split {split!r} is empty.')
    kind = records.tokens_kind(data_cfg)
    if kind == 'palette':
        palette = palette if palette is not None else load_or_fit_palette(data_cfg)
        palette.check_shape(data_cfg.n_colors, data_cfg.channels, what=f'dataset {data_cfg.name!r}')
        tokenize = transforms.PaletteTokens(palette.lookup_table())
    elif kind == 'codes':
        check_codes_dataset(data_cfg, builder)
        tokenize = transforms.CodeTokens()
    else:
        tokenize = transforms.ToUnit()
    transform = transforms.augment_for(data_cfg)
    seed = int(data_cfg.shuffle_seed if seed is None else seed) % 2**32

    if train:
        # Every process shuffles the whole split with the same seed and cuts the same global batches; each reads
        # only its slice of every global batch. The global batch (and its augmentation) is therefore the same for
        # any number of processes, so a run's losses do not depend on how many hosts feed it.
        assert rows is not None
        if n < rows.global_batch:
            raise ValueError(f'Dataset {data_cfg.name!r} split {split!r} has {n} records, fewer than one global '
                             f'batch of {rows.global_batch} (rows {rows} in this process).')
        reader = records.image_records(data_cfg, split, 0, n, builder=builder)
        positions = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)  # epoch e reshuffles
        ds = (positions.batch(rows.global_batch, drop_remainder=True)
              .map(transforms.SliceRows(rows.rows))
              .map_with_index(transforms.ReadBatch(reader, transform, train, seed, rows.rows, rows.global_batch)))
    elif rows is not None:
        # Global batches of the split in order, the last padded; every process reads its rows of each.
        padded = math.ceil(n / rows.global_batch) * rows.global_batch
        reader = records.image_records(data_cfg, split, 0, n, pad_to=padded, builder=builder)
        ds = (grain.MapDataset.range(padded).batch(rows.global_batch, drop_remainder=False)
              .map(transforms.SliceRows(rows.rows))
              .map_with_index(transforms.ReadBatch(reader, transform, train, seed, rows.rows, rows.global_batch)))
    else:
        start, stop = records.shard_range(n, options)
        per_shard = math.ceil(n / shard_count)
        padded = math.ceil(per_shard / batch_size) * batch_size
        reader = records.image_records(data_cfg, split, start, stop, pad_to=padded, builder=builder)
        positions = grain.MapDataset.range(padded)
        ds = (positions.batch(batch_size, drop_remainder=False)
              .map_with_index(transforms.ReadBatch(reader, transform, train, seed, range(batch_size), batch_size)))
    ds = ds.map(tokenize)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(data_cfg.read_threads), prefetch_buffer_size=int(data_cfg.prefetch_buffer_size)))
    if int(data_cfg.num_workers) > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)))
    return iter(it_ds)


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
