"""make_iterator, end to end on a toy dataset: tokens, splits, shuffling, augmentation, sharding, exact resume."""

import itertools

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from absl import flags

from igpt_jax.data import (
    augment,
    import_data,
    iterators,
    palette_cache,
    records,
    testing,
)

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags.
tfds.display_progress_bar(False)
N_TRAIN, N_TEST = 90, 23


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A 32x32 RGB dataset (90 train / 23 test), its config at resolution 16, and its palette."""
    tmp = tmp_path_factory.mktemp('toy')
    arrays = testing.write_npz(tmp / 'toy.npz', n_train=N_TRAIN, n_test=N_TEST, size=(32, 32), channels=3)
    import_data.import_dataset(str(tmp / 'toy.npz'), 'toy', str(tmp / 'tfds'))
    cfg = testing.small_config('toy', tmp / 'tfds', resolution=16, channels=3, n_colors=8, augment='cifar')
    palette = palette_cache.load_or_fit_palette(cfg)
    return cfg, palette, arrays


def _cfg(toy, **overrides):
    cfg = toy[0].copy_and_resolve_references()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _stored_ids(cfg, split):
    """Archive index of each stored record (from the 'id' feature)."""
    src = tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir, download=False,
                           decoders={'image': tfds.decode.SkipDecoding()})
    return [int(r['id'].decode().split('_')[1]) for r in src]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ('tokens', 'label', 'mask', 'index'))


def test_eval_batches_are_exact_tokens_in_raster_order(toy):
    cfg, palette, arrays = toy
    ids = _stored_ids(cfg, 'test')
    batches = list(iterators.make_iterator(cfg, 'test', batch_size=10, train=False, palette=palette))
    assert len(batches) == 3  # 23 examples -> 10, 10, 3 + 7 padding
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    assert b['tokens'].shape == (30, 256) and b['tokens'].dtype == np.int32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    np.testing.assert_array_equal(b['mask'], np.arange(30) < 23)
    np.testing.assert_array_equal(b['index'], np.where(np.arange(30) < 23, np.arange(30), -1))
    for r in range(23):
        image = arrays['x_test'][ids[r]]
        expected = palette.encode(augment.resize(image, 16)).reshape(-1)  # raster order
        np.testing.assert_array_equal(b['tokens'][r], expected)
        assert b['label'][r] == arrays['y_test'][ids[r]]


def test_training_epochs_are_reshuffled_permutations(toy):
    cfg = _cfg(toy)
    it = iterators.make_iterator(cfg, 'train', batch_size=10, train=True, seed=0, palette=toy[1])
    epochs = [np.concatenate([b['index'] for b in _take(it, 9)]) for _ in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(N_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(N_TRAIN))


def test_training_is_deterministic_under_a_seed(toy):
    cfg, palette, _ = toy
    make = lambda seed: iterators.make_iterator(cfg, 'train', batch_size=8, train=True, seed=seed, palette=palette)
    a, b, c = _take(make(3), 4), _take(make(3), 4), _take(make(4), 4)
    assert _same(a, b)
    assert not _same(a, c)
    assert all(x['mask'].all() for x in a)


def test_augmentation_only_in_training(toy):
    palette = toy[1]
    for style, differs in (('none', False), ('cifar', True)):
        cfg = _cfg(toy, augment=style)
        ev = list(iterators.make_iterator(cfg, 'train', batch_size=30, train=False, palette=palette))
        eval_tokens = np.concatenate([b['tokens'] for b in ev])[:N_TRAIN]
        tr = _take(iterators.make_iterator(cfg, 'train', batch_size=30, train=True, seed=1, palette=palette), 3)
        idx = np.concatenate([b['index'] for b in tr])
        train_tokens = np.concatenate([b['tokens'] for b in tr])
        same = (train_tokens == eval_tokens[idx]).all(axis=1)
        if differs:
            assert same.mean() < 0.5  # most examples are shifted or flipped
        else:
            assert same.all()


def test_exact_resume_with_grain_state(toy):
    cfg, palette, _ = toy
    make = lambda: iterators.make_iterator(cfg, 'train', batch_size=10, train=True, seed=5, palette=palette)
    it = make()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 5)  # crosses the epoch boundary at batch 9
    resumed = make()
    resumed.set_state(state)
    assert _same(expected, _take(resumed, 5))


def test_exact_resume_through_orbax_checkpoint(toy, tmp_path):
    cfg, palette, _ = toy
    make = lambda: iterators.make_iterator(cfg, 'train', batch_size=10, train=True, seed=2, palette=palette)
    it = make()
    uninterrupted = make()
    _take(uninterrupted, 4)
    _take(it, 4)
    model_state = {'w': jnp.arange(6.0).reshape(2, 3), 'step': jnp.int32(4)}
    mngr = ocp.CheckpointManager(tmp_path / 'ckpt', options=ocp.CheckpointManagerOptions(max_to_keep=2))
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(model_state),
                                         data=iterators.iterator_save_args(it)))
    _take(it, 3)  # the loop goes on while the save may still be in flight
    mngr.wait_until_finished()
    mngr.close()

    fresh = make()
    mngr = ocp.CheckpointManager(tmp_path / 'ckpt')
    assert mngr.latest_step() == 4
    restored = mngr.restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(model_state), data=iterators.iterator_restore_args(fresh)))
    np.testing.assert_array_equal(restored['state']['w'], model_state['w'])
    assert _same(_take(uninterrupted, 6), _take(restored['data'], 6))


def test_validation_split_and_fold_val(toy):
    palette = toy[1]
    cfg = _cfg(toy, val_fraction=0.1)
    assert records.num_examples(cfg, 'train') == 81
    assert records.num_examples(cfg, 'validation') == 9
    assert records.num_examples(cfg, 'test') == N_TEST
    val = np.concatenate([b['index'][b['mask']] for b in
                          iterators.make_iterator(cfg, 'validation', batch_size=4, train=False, palette=palette)])
    np.testing.assert_array_equal(val, np.arange(81, 90))  # the last 10% of the stored records
    train = np.concatenate([b['index'] for b in _take(
        iterators.make_iterator(cfg, 'train', batch_size=9, train=True, palette=palette), 9)])
    np.testing.assert_array_equal(np.sort(train), np.arange(81))
    cfg.fold_val = True
    assert records.num_examples(cfg, 'train') == 90 and records.num_examples(cfg, 'validation') == 9
    train = np.concatenate([b['index'] for b in _take(
        iterators.make_iterator(cfg, 'train', batch_size=9, train=True, palette=palette), 10)])
    np.testing.assert_array_equal(np.sort(train), np.arange(90))
    with pytest.raises(ValueError, match='no validation split'):
        records.num_examples(_cfg(toy, val_fraction=0.0), 'validation')


@pytest.mark.parametrize('shard_count', [2, 3, 7, 30])
def test_eval_shards_are_disjoint_complete_and_in_step(toy, shard_count):
    cfg, palette, _ = toy
    seen, lengths = [], set()
    for i in range(shard_count):
        batches = list(iterators.make_iterator(cfg, 'test', batch_size=4, train=False, palette=palette,
                                               shard_index=i, shard_count=shard_count))
        lengths.add(len(batches))
        seen.extend(int(x) for b in batches for x in b['index'][b['mask']])
    assert len(lengths) == 1  # every process runs the same number of eval steps
    assert sorted(seen) == list(range(N_TEST))  # 23 records in 1 array_record file, any shard count


def test_train_shards_are_disjoint_and_complete(toy):
    cfg, palette, _ = toy
    parts = []
    for i in range(2):
        it = iterators.make_iterator(cfg, 'train', batch_size=5, train=True, seed=0, palette=palette,
                                     shard_index=i, shard_count=2)
        parts.append(np.concatenate([b['index'] for b in _take(it, 9)]))  # one epoch of 45 each
    assert not set(parts[0]) & set(parts[1])
    assert sorted(np.concatenate(parts).tolist()) == list(range(N_TRAIN))
    with pytest.raises(ValueError, match='has 90 records, fewer than one global batch of 500'):
        iterators.make_iterator(cfg, 'train', batch_size=5, train=True, palette=palette, shard_index=0, shard_count=100)


def test_grain_worker_processes_give_the_same_batches(toy):
    cfg, palette, _ = toy
    a = _take(iterators.make_iterator(cfg, 'train', batch_size=10, train=True, seed=7, palette=palette), 4)
    it = iterators.make_iterator(_cfg(toy, num_workers=2), 'train', batch_size=10, train=True, seed=7,
                                 palette=palette)
    try:
        assert _same(a, _take(it, 4))
    finally:
        it.close()


def test_embedded_digits_default(tmp_path):
    from igpt_jax.data.config import default_data_config  # pylint: disable=g-import-not-at-top

    cfg = default_data_config()
    cfg.data_dir = str(tmp_path / 'tfds')
    assert cfg.name == 'digits' and cfg.auto_import
    assert [records.num_examples(cfg, s) for s in ('train', 'validation', 'test')] == [1350, 150, 297]
    assert records.num_classes(cfg) == 10
    batches = list(iterators.make_iterator(cfg, 'test', batch_size=100, train=False))
    tokens = np.concatenate([b['tokens'] for b in batches])
    assert tokens.shape == (300, 64) and 0 <= tokens.min() and tokens.max() < 16
    assert sum(b['mask'].sum() for b in batches) == 297
    assert (tmp_path / 'tfds' / 'digits' / 'palette_k16_c1_r8_s0.npy').exists()
    assert iterators.make_iterator(cfg, 'train', batch_size=8, train=True).get_state() == {'next_index': 0}


def test_missing_dataset_without_auto_import(tmp_path):
    cfg = testing.small_config('nothing_here', tmp_path, resolution=8, channels=3)
    with pytest.raises(FileNotFoundError, match=r"'nothing_here' not found.*import_data --name=nothing_here"):
        records.num_examples(cfg, 'train')


def test_iterators_yield_infinite_training_batches(toy):
    cfg, palette, _ = toy
    it = iterators.make_iterator(cfg, 'train', batch_size=32, train=True, palette=palette)
    batches = list(itertools.islice(it, 7))  # 224 examples from 90 records: repeats
    assert all(b['tokens'].shape == (32, 256) for b in batches)
