"""Importing .npz archives and image folders into TFDS datasets (array_record, no TF)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from igpt_jax.data import builders, import_data, testing, verify

flags.FLAGS.mark_as_parsed()
tfds.display_progress_bar(False)
SHARED_DATA = Path(__file__).parents[2] / 'shared' / 'data'


def _read_all(name, data_dir, split, channels):
    src = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False,
                           decoders={'image': tfds.decode.SkipDecoding()})
    return [dict(raw, image=builders.decode_image(raw['image'], channels)) for raw in src]


def test_npz_cifar10_catalog_compatible(tmp_path):
    arrays = testing.write_npz(tmp_path / 'c.npz', n_train=30, n_test=12, size=(32, 32), channels=3)
    data_dir = tmp_path / 'tfds'
    assert import_data.import_dataset(str(tmp_path / 'c.npz'), 'cifar10', str(data_dir)) == 'imported'
    builder = tfds.builder('cifar10', data_dir=str(data_dir))
    assert type(builder).__module__.startswith('tensorflow_datasets.')  # TFDS's own catalog class reads it
    assert str(builder.version) == '3.0.2'
    assert set(builder.info.features.keys()) == {'id', 'image', 'label'}
    assert builder.info.features['image'].shape == (32, 32, 3)
    assert builder.info.features['label'].names == list(builders.CIFAR10_LABELS)
    for split, n in (('train', 30), ('test', 12)):
        assert builder.info.splits[split].num_examples == n
        records = _read_all('cifar10', data_dir, split, 3)
        assert len(records) == n
        ids = sorted(int(r['id'].decode().split('_')[1]) for r in records)
        assert ids == list(range(n))
        for r in records:
            i = int(r['id'].decode().split('_')[1])
            np.testing.assert_array_equal(r['image'], arrays[f'x_{split}'][i])
            assert int(r['label']) == arrays[f'y_{split}'][i]
        assert verify.verify_split('cifar10', str(data_dir), split, arrays[f'x_{split}'], arrays[f'y_{split}']) == n


def test_npz_fashion_mnist_grayscale_in_official_order(tmp_path):
    arrays = testing.write_npz(tmp_path / 'f.npz', n_train=25, n_test=7, size=(28, 28), channels=1,
                               squeeze_gray=True)
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(tmp_path / 'f.npz'), 'fashion_mnist', data_dir)
    info = tfds.builder('fashion_mnist', data_dir=data_dir).info
    assert str(info.version) == '3.0.1' and set(info.features.keys()) == {'image', 'label'}
    assert info.features['image'].shape == (28, 28, 1)
    records = _read_all('fashion_mnist', data_dir, 'train', 1)
    order = verify.official_order('train', 25)
    assert sorted(order.tolist()) == list(range(25))
    for r, i in zip(records, order):
        np.testing.assert_array_equal(r['image'][..., 0], arrays['x_train'][i])
        assert int(r['label']) == arrays['y_train'][i]


def test_real_cifar10_slice(tmp_path):
    path = SHARED_DATA / 'cifar10.npz'
    if not path.exists():
        pytest.skip(f'{path} not present')
    with np.load(path) as z:
        sl = {k: z[k][:64] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
    np.savez(tmp_path / 'cifar10.npz', **sl)
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(tmp_path / 'cifar10.npz'), 'cifar10', data_dir)
    for split in ('train', 'test'):
        assert verify.verify_split('cifar10', data_dir, split, sl[f'x_{split}'], sl[f'y_{split}']) == 64


def _tree(path):
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in Path(path).rglob('*') if p.is_file()}


def test_import_is_idempotent_and_never_destroys(tmp_path):
    testing.write_npz(tmp_path / 'a.npz', n_train=10, n_test=4, size=(8, 8), channels=3)
    testing.write_npz(tmp_path / 'b.npz', n_train=12, n_test=4, size=(8, 8), channels=3, seed=5)
    data_dir = str(tmp_path / 'tfds')
    assert import_data.import_dataset(str(tmp_path / 'a.npz'), 'toy', data_dir) == 'imported'
    (tmp_path / 'tfds' / 'toy' / 'palette_k8_c3_r8_s0.npy').write_bytes(b'x')
    before = _tree(tmp_path / 'tfds')
    assert import_data.import_dataset(str(tmp_path / 'a.npz'), 'toy', data_dir) == 'exists'
    assert _tree(tmp_path / 'tfds') == before
    with pytest.raises(FileExistsError, match=r"toy/1.0.0 holds splits \{'train': 10, 'test': 4\}.*--overwrite"):
        import_data.import_dataset(str(tmp_path / 'b.npz'), 'toy', data_dir)
    assert _tree(tmp_path / 'tfds') == before
    assert import_data.import_dataset(str(tmp_path / 'b.npz'), 'toy', data_dir, overwrite=True) == 'imported'
    assert tfds.builder('toy', data_dir=data_dir).info.splits['train'].num_examples == 12
    assert not (tmp_path / 'tfds' / 'toy' / 'palette_k8_c3_r8_s0.npy').exists()  # fitted on the old data


def test_incomplete_or_foreign_directory_is_kept(tmp_path):
    testing.write_npz(tmp_path / 'a.npz', n_train=10, n_test=4, size=(8, 8), channels=3)
    version_dir = tmp_path / 'tfds' / 'toy' / '1.0.0'
    version_dir.mkdir(parents=True)
    (version_dir / 'precious.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='no dataset_info.json'):
        import_data.import_dataset(str(tmp_path / 'a.npz'), 'toy', str(tmp_path / 'tfds'))
    assert (version_dir / 'precious.txt').read_text() == 'mine'
    import_data.import_dataset(str(tmp_path / 'a.npz'), 'toy', str(tmp_path / 'tfds'), overwrite=True)
    assert not (version_dir / 'precious.txt').exists()
    assert (version_dir / 'dataset_info.json').exists()


def _save(path, array, fmt='PNG'):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_folder_with_train_test_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'photos'
    expected = {}
    for split, n in (('train', 3), ('test', 2)):
        for cls in ('cat', 'dog'):
            for j in range(n):
                img = rng.integers(0, 256, (10 + j, 12, 3), dtype=np.uint8)
                _save(root / split / cls / f'{j}.png', img)
                expected[f'{split}/{cls}/{j}.png'] = (img, ['cat', 'dog'].index(cls))
    (root / 'train' / 'cat' / 'notes.txt').write_text('not an image, ignored')
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(root), 'photos', data_dir)
    info = tfds.builder('photos', data_dir=data_dir).info
    assert info.features['label'].names == ['cat', 'dog']
    assert info.features['image'].shape == (None, None, 3)
    for split, n in (('train', 6), ('test', 4)):
        records = _read_all('photos', data_dir, split, 3)
        assert len(records) == n
        for r in records:
            img, label = expected[r['id'].decode()]
            np.testing.assert_array_equal(r['image'], img)  # PNG bytes stored as they are
            assert int(r['label']) == label


def test_folder_without_splits_is_split_deterministically(tmp_path):
    root = tmp_path / 'flat'
    rng = np.random.default_rng(1)
    for cls in ('a', 'b', 'c'):
        for j in range(20):
            _save(root / cls / f'{j:02d}.jpg', rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 'JPEG')
    src1 = import_data.folder_source(str(root), 'flat', test_fraction=0.25)
    src2 = import_data.folder_source(str(root), 'flat', test_fraction=0.25)
    assert src1.counts == src2.counts and sum(src1.counts.values()) == 60
    assert 5 <= src1.counts['test'] <= 25
    keys1 = [k for k, _ in src1.examples['test']()]
    assert keys1 == [k for k, _ in src2.examples['test']()]
    assert not set(keys1) & {k for k, _ in src1.examples['train']()}


def test_imagenet2012_folder_uses_catalog_labels(tmp_path):
    root = tmp_path / 'imnet'
    rng = np.random.default_rng(2)
    for split in ('train', 'val'):
        for wnid in ('n01440764', 'n15075141'):
            _save(root / split / wnid / f'{wnid}_1.JPEG', rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), 'JPEG')
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(root), 'imagenet2012', data_dir)
    info = tfds.builder('imagenet2012', data_dir=data_dir).info
    assert str(info.version) == '5.1.0' and set(info.splits.keys()) == {'train', 'validation'}
    labels = sorted(int(r['label']) for r in _read_all('imagenet2012', data_dir, 'validation', 3))
    assert labels == [0, 999]  # first and last synset of TFDS's labels.txt
    with pytest.raises(import_data.ImportSourceError, match='not classes of imagenet2012'):
        _save(root / 'train' / 'kitten' / 'x.JPEG', np.zeros((4, 4, 3), np.uint8), 'JPEG')
        import_data.folder_source(str(root), 'imagenet2012')


def test_bad_sources(tmp_path):
    # Label out of range for a 10-class catalog dataset: names the file, array and index.
    arrays = testing.write_npz(tmp_path / 'c.npz', n_train=6, n_test=3, size=(32, 32), channels=3)
    arrays['y_train'][4] = 12
    np.savez(tmp_path / 'bad_label.npz', **arrays)
    with pytest.raises(import_data.ImportSourceError, match=r'bad_label.npz: y_train\[4\] = 12 is outside \[0, 10\)'):
        import_data.import_dataset(str(tmp_path / 'bad_label.npz'), 'cifar10', str(tmp_path / 'tfds'))
    # Wrong image size for the catalog's fixed shape.
    testing.write_npz(tmp_path / 'small.npz', n_train=4, n_test=2, size=(16, 16), channels=3)
    with pytest.raises(import_data.ImportSourceError, match='16x16, but cifar10 images are 32x32'):
        import_data.import_dataset(str(tmp_path / 'small.npz'), 'cifar10', str(tmp_path / 'tfds'))
    # A file that is not an image in a class folder.
    _save(tmp_path / 'imgs' / 'train' / 'a' / 'ok.png', np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / 'imgs' / 'test' / 'a' / 'ok.png', np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'imgs' / 'train' / 'a' / 'broken.png').write_bytes(b'definitely not a png')
    with pytest.raises(import_data.ImportSourceError, match=r'broken.png: not a readable image'):
        import_data.import_dataset(str(tmp_path / 'imgs'), 'imgs', str(tmp_path / 'tfds'))
    with pytest.raises(ValueError, match='Invalid dataset name'):
        import_data.import_dataset(str(tmp_path / 'c.npz'), 'Bad-Name', str(tmp_path / 'tfds'))
    with pytest.raises(import_data.ImportSourceError, match="'mnist' is a TFDS catalog dataset"):
        import_data.import_dataset(str(tmp_path / 'c.npz'), 'mnist', str(tmp_path / 'tfds'))
    assert not (tmp_path / 'tfds' / 'cifar10').exists()  # nothing half-written


def test_rgba_npz_is_stored_as_rgb(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 4), dtype=np.uint8)
    np.savez(tmp_path / 'rgba.npz', x_train=rgba, y_train=np.arange(5) % 2, x_test=rgba[:2], y_test=np.arange(2))
    import_data.import_dataset(str(tmp_path / 'rgba.npz'), 'rgba_toy', str(tmp_path / 'tfds'))
    info = tfds.builder('rgba_toy', data_dir=str(tmp_path / 'tfds')).info
    assert info.features['image'].shape == (8, 8, 3) and info.features['label'].num_classes == 2
    for r in _read_all('rgba_toy', tmp_path / 'tfds', 'train', 3):
        np.testing.assert_array_equal(r['image'], rgba[int(r['id'].decode().split('_')[1]), ..., :3])


def test_cli(tmp_path):
    testing.write_npz(tmp_path / 'a.npz', n_train=6, n_test=2, size=(8, 8), channels=1)
    cmd = [sys.executable, '-m', 'igpt_jax.data.import_data', f'--source={tmp_path / "a.npz"}', '--name=cli_toy',
           f'--data_dir={tmp_path / "tfds"}']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    root = Path(__file__).parents[1]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'cli_toy: imported' in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert second.returncode == 0 and 'already complete, nothing to do' in second.stdout


def test_decode_image_modes_and_jpeg_draft():
    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, format='JPEG')
    full = builders.decode_image(buf.getvalue(), 3)
    assert full.shape == (300, 400, 3)
    small = builders.decode_image(buf.getvalue(), 3, min_side=64)  # libjpeg scales by 1/4: 75x100
    assert small.shape == (75, 100, 3)
    gray = builders.decode_image(buf.getvalue(), 1, min_side=64)
    assert gray.shape == (75, 100, 1)
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 6, 4), (10, 20, 30, 0), np.uint8), 'RGBA').save(buf, format='PNG')
    np.testing.assert_array_equal(builders.decode_image(buf.getvalue(), 3), np.full((5, 6, 3), (10, 20, 30)))
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 6), 200, np.uint16)).save(buf, format='PNG')  # 16-bit grey
    np.testing.assert_array_equal(builders.decode_image(buf.getvalue(), 1), np.zeros((5, 6, 1)))
    np.testing.assert_array_equal(builders.decode_image(buf.getvalue(), 3), np.zeros((5, 6, 3)))


def test_empty_class_folder_and_empty_split_are_refused_with_the_counts(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / 'pets'
    for j in range(3):
        _save(root / 'train' / 'cat' / f'{j}.png', rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    (root / 'train' / 'dog').mkdir(parents=True)
    with pytest.raises(import_data.ImportSourceError,
                       match=r"class folder .*pets/train/dog has no images \(1 such folder\(s\); images per class "
                             r"elsewhere: cat: 3\)"):
        import_data.import_dataset(str(root), 'pets', str(tmp_path / 'tfds'))
    (root / 'train' / 'dog').rmdir()
    with pytest.raises(import_data.ImportSourceError,
                       match=r"pets: the test split would be empty \(train 3 images, test 0\); add a test/ folder"):
        import_data.import_dataset(str(root), 'pets', str(tmp_path / 'tfds'))
    flat = tmp_path / 'flat'
    for j in range(2):
        _save(flat / 'cat' / f'{j}.png', rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    with pytest.raises(import_data.ImportSourceError, match=r"flat: the test split would be empty \(train 2 images, "
                                                            r"test 0\); choose another --test_fraction than 0.1"):
        import_data.import_dataset(str(flat), 'flat', str(tmp_path / 'tfds'))
    arrays = testing.write_npz(tmp_path / 'a.npz', n_train=4, n_test=1, size=(8, 8), channels=1)
    np.savez(tmp_path / 'no_test.npz', **dict(arrays, x_test=arrays['x_test'][:0], y_test=arrays['y_test'][:0]))
    with pytest.raises(import_data.ImportSourceError, match=r"no_test.npz: x_test has no images \(x_train 4, x_test 0\)"):
        import_data.import_dataset(str(tmp_path / 'no_test.npz'), 'no_test', str(tmp_path / 'tfds'))
    assert not (tmp_path / 'tfds').exists()  # refused before anything was written


def test_cli_errors_are_one_line_and_help_shows_no_machine_path(tmp_path):
    testing.write_npz(tmp_path / 'a.npz', n_train=4, n_test=2, size=(8, 8), channels=1)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    root = Path(__file__).parents[1]
    cmd = [sys.executable, '-m', 'igpt_jax.data.import_data', f'--source={tmp_path / "a.npz"}', '--name=mnist',
           f'--data_dir={tmp_path / "tfds"}']
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: 'mnist' is a TFDS catalog dataset with its own features and version; import under another name "
        "(e.g. my_mnist) or use one of cifar10, fashion_mnist, imagenet2012."]
    assert not (tmp_path / 'tfds').exists()
    usage = subprocess.run([sys.executable, '-m', 'igpt_jax.data.import_data', '--help'], capture_output=True,
                           text=True, timeout=120, cwd=root, env=env)
    assert '--source' in usage.stdout and 'import_data' in usage.stdout  # absl's --help exits 1
    assert str(root) not in usage.stdout and '/work/' not in usage.stdout
