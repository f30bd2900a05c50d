"""Bad input: converted modes, resized sizes, and errors naming dataset, split and record."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from igpt_jax.data import (
    augment,
    import_data,
    iterators,
    palette_cache,
    records,
    testing,
)
from igpt_jax.data.palette import Palette

flags.FLAGS.mark_as_parsed()
tfds.display_progress_bar(False)


def _rgb_reference(pil):
    """What an RGB dataset should see: Pillow's conversion (alpha dropped), as uint8 [H, W, 3]."""
    if pil.mode in ('RGBA', 'LA', 'PA'):
        pil = pil.convert('RGBA')
        return np.asarray(pil)[..., :3]
    return np.asarray(pil.convert('RGB'))


def _messy_images(rng):
    """Images in every mode and size that the folder importer may meet."""
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {
        'rgb.png': Image.fromarray(rgb),
        'gray.png': Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), 'L'),
        'rgba.png': Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), 'RGBA'),
        'gray_alpha.png': Image.fromarray(rng.integers(0, 256, (32, 32, 2), dtype=np.uint8), 'LA'),
        'palette.png': Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=16),
        'small.png': Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
        'wide.png': Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
        'photo.jpg': Image.fromarray(rgb),
    }


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('messy')
    rng = np.random.default_rng(0)
    root = tmp / 'messy'
    originals = {}
    for split in ('train', 'test'):
        for cls in ('a', 'b'):
            (root / split / cls).mkdir(parents=True)
            for fname, pil in _messy_images(rng).items():
                path = root / split / cls / fname
                pil.save(path)
                with Image.open(path) as reread:
                    originals[f'{split}/{cls}/{fname}'] = _rgb_reference(reread)
    good = (root / 'test' / 'b' / 'rgb.png').read_bytes()
    (root / 'test' / 'b' / 'truncated.png').write_bytes(good[:len(good) // 2])  # header intact, data cut
    import_data.import_dataset(str(root), 'messy', str(tmp / 'tfds'))
    cfg = testing.small_config('messy', tmp / 'tfds', resolution=16, channels=3, n_colors=8)
    palette = palette_cache.load_or_fit_palette(cfg)
    return cfg, palette, originals


def _record_of(cfg, split, file_id):
    src = tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir, download=False,
                           decoders={'image': tfds.decode.SkipDecoding()})
    ids = [r['id'].decode() for r in src]
    return ids.index(file_id), ids


def test_modes_are_converted_and_sizes_resized(messy):
    cfg, palette, originals = messy
    _, ids = _record_of(cfg, 'train', 'train/a/rgb.png')
    batches = list(iterators.make_iterator(cfg, 'train', batch_size=4, train=False, palette=palette))
    tokens = np.concatenate([b['tokens'] for b in batches])
    assert tokens.shape == (16, 256)
    for r, file_id in enumerate(ids):  # JPEGs included: `originals` holds the decoded file
        expected = palette.encode(augment.resize(originals[file_id], 16)).reshape(-1)
        np.testing.assert_array_equal(tokens[r], expected, err_msg=file_id)
    # Training (augmented) also handles every mode and size.
    it = iterators.make_iterator(cfg, 'train', batch_size=16, train=True, palette=palette)
    assert next(it)['tokens'].shape == (16, 256)


def test_grayscale_dataset_converts_rgb_images(messy, tmp_path):
    cfg = messy[0].copy_and_resolve_references()
    cfg.channels, cfg.n_colors, cfg.palette_path = 1, 8, str(tmp_path / 'gray_palette.npy')
    batches = list(iterators.make_iterator(cfg, 'train', batch_size=16, train=False))
    assert batches[0]['tokens'].shape == (16, 256)
    assert Palette.load(tmp_path / 'gray_palette.npy').channels == 1


@pytest.mark.parametrize('train', [False, True])
def test_undecodable_record_names_dataset_split_and_index(messy, train):
    cfg, palette, _ = messy
    record, _ = _record_of(cfg, 'test', 'test/b/truncated.png')
    it = iterators.make_iterator(cfg, 'test', batch_size=17, train=train, palette=palette)
    with pytest.raises(records.DataError,
                       match=rf"dataset 'messy', split 'test', record {record}: cannot decode the image"):
        next(it)


def test_undecodable_record_in_validation_names_the_tfds_split(messy):
    cfg = messy[0].copy_and_resolve_references()
    cfg.train_split, cfg.test_split = 'test', 'test'  # put the broken split behind 'validation'
    cfg.val_fraction = 0.99
    record, _ = _record_of(cfg, 'test', 'test/b/truncated.png')
    it = iterators.make_iterator(cfg, 'validation', batch_size=17, train=False, palette=messy[1])
    with pytest.raises(records.DataError, match=rf"split 'validation' \(TFDS split 'test'\), record {record}:"):
        next(it)


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
    """A dataset whose test split holds an unlabeled example (-1) at archive index 3."""
    tmp = tmp_path_factory.mktemp('labels')
    arrays = testing.write_npz(tmp / 'l.npz', n_train=12, n_test=6, size=(8, 8), channels=3, classes=10)
    arrays['y_train'][:] = np.arange(12) % 10
    arrays['y_test'][3] = -1
    np.savez(tmp / 'l.npz', **arrays)
    import_data.import_dataset(str(tmp / 'l.npz'), 'labelled', str(tmp / 'tfds'))
    cfg = testing.small_config('labelled', tmp / 'tfds', resolution=8, channels=3, n_colors=4)
    return cfg, palette_cache.load_or_fit_palette(cfg)


def test_unlabeled_example_is_an_error_unless_allowed(labelled):
    cfg, palette = labelled
    record, _ = _record_of(cfg, 'test', 'test_00003')
    with pytest.raises(records.DataError,
                       match=rf"dataset 'labelled', split 'test', record {record}: label -1 is outside \[0, 10\)"):
        list(iterators.make_iterator(cfg, 'test', batch_size=6, train=False, palette=palette))
    cfg = cfg.copy_and_resolve_references()
    cfg.allow_unlabeled = True
    (batch,) = list(iterators.make_iterator(cfg, 'test', batch_size=6, train=False, palette=palette))
    assert batch['label'][record] == -1 and batch['mask'].all()


def test_label_out_of_range_of_the_dataset_metadata(labelled, tmp_path):
    cfg, palette = labelled
    # A dataset whose metadata declares fewer classes than its records use (foreign or edited).
    import shutil  # pylint: disable=g-import-not-at-top

    src = f'{cfg.data_dir}/labelled/1.0.0'
    dst = tmp_path / 'tfds' / 'labelled' / '1.0.0'
    shutil.copytree(src, dst)
    feats = json.loads((dst / 'features.json').read_text())
    feats['featuresDict']['features']['label']['classLabel']['numClasses'] = '5'
    (dst / 'features.json').write_text(json.dumps(feats))
    (dst / 'label.labels.txt').write_text('\n'.join(str(i) for i in range(5)) + '\n')
    cfg = cfg.copy_and_resolve_references()
    cfg.data_dir = str(tmp_path / 'tfds')
    assert records.num_classes(cfg) == 5
    src_ds = tfds.data_source('labelled', split='train', data_dir=cfg.data_dir, download=False,
                              decoders={'image': tfds.decode.SkipDecoding()})
    first_bad = next(r for r, ex in enumerate(src_ds) if int(ex['label']) >= 5)
    label = int(src_ds[first_bad]['label'])
    where = f"dataset 'labelled', split 'train', record {first_bad}"
    with pytest.raises(records.DataError, match=rf"{where}: label {label} is outside \[0, 5\)"):
        list(iterators.make_iterator(cfg, 'train', batch_size=12, train=False, palette=palette))


def test_palette_shape_mismatch(labelled, tmp_path):
    cfg, _ = labelled
    cfg = cfg.copy_and_resolve_references()
    cfg.palette_path = str(tmp_path / 'p.npy')
    Palette(np.zeros((6, 3), np.float32)).save(cfg.palette_path)
    with pytest.raises(ValueError, match=r"dataset 'labelled', palette .*p.npy: palette has shape \(6, 3\), "
                                         r'but the config expects \(4, 3\)'):
        palette_cache.load_or_fit_palette(cfg)
    with pytest.raises(ValueError, match=r"dataset 'labelled'.*expects \(4, 3\)"):
        iterators.make_iterator(cfg, 'test', batch_size=2, train=False)
    with pytest.raises(ValueError, match=r"dataset 'labelled'.*shape \(4, 1\).*expects \(4, 3\)"):
        iterators.make_iterator(cfg, 'test', batch_size=2, train=False,
                                palette=Palette(np.zeros((4, 1), np.float32)))
