"""records: the splits cut from the TFDS splits, and ImageRecords, the reader of a split's records (the session's
digits: 1,500 train and 297 test records)."""

import pickle

import grain
import numpy as np
import pytest
from absl import flags

from igpt_jax.data import records
from igpt_jax.data.config import default_data_config

flags.FLAGS.mark_as_parsed()




def test_validation_is_the_end_of_the_tfds_train_split(digits_cfg):
    assert [records.split_bounds(digits_cfg, s) for s in records.SPLITS] == [
        ('train', 0, 1350), ('train', 1350, 1500), ('test', 0, 297)]
    assert [records.num_examples(digits_cfg, s) for s in records.SPLITS] == [1350, 150, 297]
    assert records.num_classes(digits_cfg) == 10
    digits_cfg.fold_val = True  # trains on the validation records too; 'validation' is unchanged
    assert records.split_bounds(digits_cfg, 'train') == ('train', 0, 1500)
    assert records.split_bounds(digits_cfg, 'validation') == ('train', 1350, 1500)
    digits_cfg.test_split = 'train'
    assert records.split_bounds(digits_cfg, 'test') == ('train', 0, 1500)


def test_bad_splits_are_refused(digits_cfg):
    with pytest.raises(ValueError, match='split must be one of'):
        records.split_bounds(digits_cfg, 'val')
    digits_cfg.val_fraction = 0.0
    with pytest.raises(ValueError, match='no validation split'):
        records.num_examples(digits_cfg, 'validation')
    digits_cfg.val_fraction = 1.0
    with pytest.raises(ValueError, match=r'val_fraction must be in \[0, 1\)'):
        records.num_examples(digits_cfg, 'train')
    digits_cfg.val_fraction, digits_cfg.test_split = 0.1, 'dev'
    with pytest.raises(ValueError, match="has no split 'dev'"):
        records.num_examples(digits_cfg, 'test')


def test_tokens_kind():
    digits_cfg = default_data_config('digits')
    assert records.tokens_kind(digits_cfg) == 'palette'
    del digits_cfg.tokens  # a config written before data.tokens existed
    assert records.tokens_kind(digits_cfg) == 'palette'
    digits_cfg.tokens = 'pixels'
    with pytest.raises(ValueError, match='data.tokens must be one of'):
        records.tokens_kind(digits_cfg)


def test_image_records_read_decode_and_pad(digits_cfg):
    reader = records.image_records(digits_cfg, 'validation', 10, 20, pad_to=12)
    assert len(reader) == 12 and (reader.start, reader.stop) == (1360, 1370)
    first = reader[0]
    assert first['image'].shape == (8, 8, 1) and first['image'].dtype == np.uint8
    assert (int(first['index']), bool(first['mask'])) == (1360, True) and 0 <= int(first['label']) < 10
    pad = reader[11]
    assert (int(pad['index']), bool(pad['mask']), int(pad['image'].max())) == (-1, False, 0)
    batch = reader._getitems([3, 11, 0])  # one batched read, in the order asked
    for got, i in zip(batch, (3, 11, 0)):
        assert all(np.array_equal(got[k], reader[i][k]) for k in ('image', 'label', 'index', 'mask'))
    with pytest.raises(IndexError):
        reader[12]
    again = pickle.loads(pickle.dumps(reader))  # what a Grain worker gets: the source reopens there
    assert np.array_equal(again[0]['image'], first['image'])


@pytest.mark.parametrize('n', [0, 1, 7, 23])
@pytest.mark.parametrize('count', [1, 2, 3, 7, 30])
def test_shard_ranges_are_contiguous_disjoint_and_even(n, count):
    ranges = [records.shard_range(n, grain.sharding.ShardOptions(i, count)) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    dropped = [records.shard_range(n, grain.sharding.ShardOptions(i, count, drop_remainder=True)) for i in range(count)]
    assert all(b - a == n // count for a, b in dropped)
