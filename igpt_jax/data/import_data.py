r"""Imports local images into a TFDS (array_record) dataset, without TensorFlow.

Usage:
  python -m igpt_jax.data.import_data --source=path/to/cifar10.npz \
      --name=cifar10 --data_dir=/tmp/tfds [--overwrite]
  python -m igpt_jax.data.import_data --source=/path/to/photos --name=my_photos \
      --data_dir=/tmp/tfds [--channels=3] [--test_fraction=0.1]
  python -m igpt_jax.data.import_data --name=digits --data_dir=/tmp/tfds

Sources:
  * a .npz with x_train, y_train, x_test, y_test (images [N, H, W(, C)] uint8,
    labels [N] ints in the official order), like the archives in shared/data;
  * a folder with one sub-folder per class, optionally under train/ and test/
    (or val/, validation/); without them each file goes to test when a hash of
    its relative path falls below --test_fraction (stable, deterministic).
    Every class folder must hold images, and both splits must get some;
  * nothing, for --name=digits (scikit-learn's bundled 8x8 digits).

The import is idempotent: a complete dataset with the same splits and sizes
is left as it is ("already complete"). An existing directory that is
incomplete or different is never removed unless --overwrite is given, which
also removes the palettes fitted on the old data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from PIL import Image

from igpt_jax.data import builders
from igpt_jax.data.builders import DatasetSpec
from igpt_jax.data.config import resolve_data_dir

_IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm'}
_TEST_DIR_NAMES = ('test', 'val', 'validation')


class ImportSourceError(ValueError):
    """A problem with the data being imported (names the file and record)."""


@dataclasses.dataclass
class ImportSource:
    """What to write: the spec, an example generator per split, and the split sizes."""

    spec: DatasetSpec
    examples: dict[str, builders.ExampleGen]
    counts: dict[str, int]
    description: str


# -------------------------------------------------------------------- npz
def npz_source(path: str, name: str, *, channels: int | None = None) -> ImportSource:
    """A .npz archive with x_train, y_train, x_test, y_test.

    Args:
      path: the archive.
      name: dataset name; a catalog name fixes image shape and classes.
      channels: for non-catalog names, the channels to store (default: the
        archive's, RGBA stored as RGB).

    Raises:
      ImportSourceError: missing arrays, an empty split, wrong image shape, bad labels.
    """
    with epath.Path(path).open('rb') as f:
        with np.load(f, allow_pickle=False) as z:
            missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in z.files]
            if missing:
                raise ImportSourceError(f'{path}: missing arrays {missing} (has {sorted(z.files)}).')
            arrays = {k: z[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
            names_in_file = [str(s) for s in z['label_names']] if 'label_names' in z.files else None

    for split in ('train', 'test'):
        x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 2, 3, 4)):
            raise ImportSourceError(
                f'{path}: x_{split} must be uint8 [N, H, W] or [N, H, W, C], got {x.dtype} {x.shape}.')
        if x.ndim == 3:
            arrays[f'x_{split}'] = x[..., None]
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ImportSourceError(
                f'{path}: y_{split} must be integers [N] with N = {len(x)}, got {y.dtype} {y.shape}.')
        arrays[f'y_{split}'] = y
        if not len(x):
            raise ImportSourceError(f'{path}: x_{split} has no images (x_train {len(arrays["x_train"])}, '
                                    f'x_test {len(arrays["x_test"])}); both splits need some.')

    spec = builders.catalog_spec(name)
    x_shape = arrays['x_train'].shape[1:]
    if spec is None:
        c_in = x_shape[-1]
        c = channels or {1: 1, 2: 1, 3: 3, 4: 3}[c_in]
        n_cls = int(max(arrays['y_train'].max(initial=0), arrays['y_test'].max(initial=0))) + 1
        label_names = tuple(names_in_file) if names_in_file else tuple(str(i) for i in range(n_cls))
        spec = DatasetSpec(name=name, version='1.0.0', image_shape=(x_shape[0], x_shape[1], c),
                           label_names=label_names, description=f'Imported from {epath.Path(path).name}.')
    for split in ('train', 'test'):
        x = arrays[f'x_{split}']
        h, w, _ = spec.image_shape
        if (h is not None and x.shape[1] != h) or (w is not None and x.shape[2] != w):
            raise ImportSourceError(
                f'{path}: x_{split} images are {x.shape[1]}x{x.shape[2]}, but {name} images are {h}x{w}. '
                'Import under another name to keep other sizes.')
        _check_labels(arrays[f'y_{split}'], spec.num_classes, f'{path}: y_{split}')

    out_splits = dict(zip(('train', 'test'), spec.splits))

    def gen(split: str) -> builders.ExampleGen:
        x, y = arrays[f'x_{split}'], arrays[f'y_{split}']

        def examples() -> Iterator[tuple[Any, dict[str, Any]]]:
            prefix = f'{split}_'
            for i in range(len(x)):
                ex = {'image': builders.encode_png(builders.to_channels(x[i], spec.channels)),
                      'label': int(y[i])}
                if spec.id_feature:
                    ex[spec.id_feature] = f'{prefix}{i:05d}'
                yield i, ex

        return examples

    return ImportSource(
        spec=spec,
        examples={out_splits[s]: gen(s) for s in ('train', 'test')},
        counts={out_splits[s]: len(arrays[f'x_{s}']) for s in ('train', 'test')},
        description=f'{path}',
    )


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    bad = np.flatnonzero((y < -1) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ImportSourceError(
            f'{what}[{i}] = {int(y[i])} is outside [0, {num_classes}) ({len(bad)} such labels; '
            '-1 means unlabeled).')


# ----------------------------------------------------------------- digits
def digits_source() -> ImportSource:
    """scikit-learn's bundled 8x8 digits: first 1500 train, last 297 test."""
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = d.target.astype(np.int64)
    spec = builders.catalog_spec('digits')
    parts = {'train': slice(0, 1500), 'test': slice(1500, None)}

    def gen(split: str) -> builders.ExampleGen:
        x, y = images[parts[split]], labels[parts[split]]

        def examples() -> Iterator[tuple[Any, dict[str, Any]]]:
            for i in range(len(x)):
                yield i, {'image': builders.encode_png(x[i]), 'label': int(y[i]), 'id': f'{split}_{i:05d}'}

        return examples

    return ImportSource(spec=spec, examples={s: gen(s) for s in parts},
                        counts={'train': 1500, 'test': len(images) - 1500},
                        description='sklearn.datasets.load_digits()')


# ----------------------------------------------------------------- folders
def _list_images(folder: epath.Path) -> list[epath.Path]:
    """Image files under `folder` (recursively, hidden entries skipped), sorted by path."""
    files = []
    for p in folder.iterdir():
        if p.name.startswith('.'):
            continue
        if p.is_dir():
            files.extend(_list_images(p))
        elif p.suffix.lower() in _IMAGE_SUFFIXES:
            files.append(p)
    return sorted(files, key=str)


def _subdirs(folder: epath.Path) -> list[epath.Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.')),
                  key=lambda p: p.name)


def folder_source(
    root: str, name: str, *, channels: int | None = None, test_fraction: float = 0.1
) -> ImportSource:
    """A folder of images, one sub-folder per class (optionally under train/ and test/).

    Args:
      root: the folder.
      name: dataset name; catalog names fix shape, channels and class names (the
        class folders must be among them, e.g. ImageNet synsets).
      channels: channels to store for non-catalog names (default 3).
      test_fraction: without train/test sub-folders, the fraction of files sent
        to the test split (by a hash of their relative path).

    Raises:
      ImportSourceError: no classes, a class folder without images, a split that
        would be empty, unknown class folders, or a file that is not an image.
    """
    root_p = epath.Path(root)
    if not root_p.is_dir():
        raise ImportSourceError(f'{root}: not a directory.')
    train_dir = root_p / 'train'
    test_dirs = [root_p / n for n in _TEST_DIR_NAMES if (root_p / n).is_dir()]
    if train_dir.is_dir():
        if len(test_dirs) > 1:
            raise ImportSourceError(f'{root}: several test folders {[p.name for p in test_dirs]}; keep one.')
        split_roots = {'train': train_dir, 'test': test_dirs[0] if test_dirs else None}
    else:
        split_roots = {'all': root_p}

    class_names = sorted({d.name for r in split_roots.values() if r is not None for d in _subdirs(r)})
    if not class_names:
        raise ImportSourceError(f'{root}: no class sub-folders found.')
    spec = builders.catalog_spec(name)
    if spec is None:
        spec = DatasetSpec(name=name, version='1.0.0', image_shape=(None, None, channels or 3),
                           label_names=tuple(class_names), description=f'Imported from folder {root_p.name}.')
    unknown = sorted(set(class_names) - set(spec.label_names))
    if unknown:
        raise ImportSourceError(
            f'{root}: class folders {unknown[:10]} are not classes of {name} '
            f'(expected names like {list(spec.label_names[:3])}).')
    label_of = {n: i for i, n in enumerate(spec.label_names)}

    files: dict[str, list[tuple[str, int]]] = {'train': [], 'test': []}
    per_class: dict[epath.Path, int] = {}
    for split, split_root in split_roots.items():
        if split_root is None:
            continue
        for class_dir in _subdirs(split_root):
            images = _list_images(class_dir)
            per_class[class_dir] = len(images)
            for f in images:
                rel = str(f.relative_to(root_p))
                s = split
                if split == 'all':
                    h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 2**32
                    s = 'test' if h < test_fraction else 'train'
                files[s].append((rel, label_of[class_dir.name]))
    empty = [str(d) for d, n in per_class.items() if n == 0]
    if empty:
        counts = ', '.join(f'{d.name}: {n}' for d, n in per_class.items() if n)
        raise ImportSourceError(f'class folder {empty[0]} has no images ({len(empty)} such folder(s); images per '
                                f'class elsewhere: {counts or "none"}); add images or remove the folder.')
    for split in ('train', 'test'):
        if not files[split]:
            how = (f'choose another --test_fraction than {test_fraction} or add train/ and test/ folders'
                   if 'all' in split_roots else f'add a {split}/ folder (or val/) of class folders next to train/')
            raise ImportSourceError(f'{root}: the {split} split would be empty (train {len(files["train"])} images, '
                                    f'test {len(files["test"])}); {how}.')
    fixed = spec.image_shape[0] is not None
    out_splits = dict(zip(('train', 'test'), spec.splits))

    def gen(split: str) -> builders.ExampleGen:
        def examples() -> Iterator[tuple[Any, dict[str, Any]]]:
            for rel, label in files[split]:
                data = (root_p / rel).read_bytes()
                data = _stored_bytes(data, f'{root_p / rel}', spec, fixed)
                ex: dict[str, Any] = {'image': data, 'label': label}
                if spec.id_feature == 'file_name':
                    ex['file_name'] = epath.Path(rel).name
                elif spec.id_feature:
                    ex[spec.id_feature] = rel
                yield rel, ex

        return examples

    return ImportSource(
        spec=spec,
        examples={out_splits[s]: gen(s) for s in ('train', 'test') if files[s]},
        counts={out_splits[s]: len(files[s]) for s in ('train', 'test') if files[s]},
        description=f'{root}',
    )


def _stored_bytes(data: bytes, where: str, spec: DatasetSpec, fixed: bool) -> bytes:
    """The bytes to store for an image file: PNG/JPEG as they are, others re-encoded as PNG.

    Only the header is parsed for PNG/JPEG (a truncated file is caught when it is
    read, with the dataset, split and record index). Fixed-shape catalog datasets
    are decoded, checked and re-encoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if not fixed and fmt in ('PNG', 'JPEG') and not (spec.encoding == 'jpeg' and fmt != 'JPEG'):
                return data
            arr = np.asarray(img.convert('RGBA' if img.mode in ('RGBA', 'LA', 'P', 'PA') else 'RGB'))
    except Exception as e:  # pylint: disable=broad-except
        raise ImportSourceError(f'{where}: not a readable image ({type(e).__name__}: {e}).') from e
    arr = builders.to_channels(arr, spec.channels)
    h, w, _ = spec.image_shape
    if fixed and arr.shape[:2] != (h, w):
        raise ImportSourceError(f'{where}: image is {arr.shape[0]}x{arr.shape[1]}, {spec.name} images are {h}x{w}.')
    if spec.encoding == 'jpeg':
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format='JPEG', quality=95)
        return buf.getvalue()
    return builders.encode_png(arr)


# ------------------------------------------------------------------ import
def make_source(source: str | None, name: str, *, channels: int | None = None,
                test_fraction: float = 0.1) -> ImportSource:
    """Picks the reader for `source` (None only for name='digits').

    Raises:
      ImportSourceError: bad source, or a name that TFDS's catalog uses for a
        dataset we do not reproduce (TFDS would read it with other features).
    """
    builders.check_name(name)
    if builders.catalog_spec(name) is None and _in_tfds_catalog(name):
        raise ImportSourceError(
            f'{name!r} is a TFDS catalog dataset with its own features and version; import under another '
            f'name (e.g. my_{name}) or use one of cifar10, fashion_mnist, imagenet2012.')
    if source is None:
        if name == 'digits':
            return digits_source()
        raise ImportSourceError(f'No source given for {name!r} (only digits is embedded).')
    p = epath.Path(source)
    if p.is_dir():
        return folder_source(source, name, channels=channels, test_fraction=test_fraction)
    if p.suffix == '.npz':
        if not p.exists():
            raise ImportSourceError(f'{source}: no such file.')
        return npz_source(source, name, channels=channels)
    raise ImportSourceError(f'{source}: expected a .npz file or a folder of class sub-folders.')


def _in_tfds_catalog(name: str) -> bool:
    try:
        tfds.builder_cls(name)
    except Exception:  # pylint: disable=broad-except  (DatasetNotFoundError, or an import problem)
        return False
    return True


def existing_state(data_dir: str, spec: DatasetSpec, counts: dict[str, int]) -> tuple[str, str]:
    """Classifies data_dir/name/version: 'absent', 'complete' (same splits and sizes) or 'different'.

    Returns:
      (state, human-readable detail).
    """
    version_dir = epath.Path(data_dir) / spec.name / spec.version
    if not version_dir.exists():
        return 'absent', f'{version_dir} does not exist'
    if not (version_dir / 'dataset_info.json').exists():
        return 'different', f'{version_dir} exists but holds no complete TFDS dataset (no dataset_info.json)'
    try:
        info = tfds.builder_from_directory(str(version_dir)).info
        have = {s: info.splits[s].num_examples for s in info.splits.keys()}
        feats = info.features
        shape = tuple(feats['image'].shape)
        n_cls = feats['label'].num_classes
    except Exception as e:  # pylint: disable=broad-except
        return 'different', f'{version_dir} cannot be read as a TFDS dataset ({type(e).__name__}: {e})'
    if have != counts or shape != tuple(spec.image_shape) or n_cls != spec.num_classes:
        return 'different', (f'{version_dir} holds splits {have}, image {shape}, {n_cls} classes; '
                             f'the source has {counts}, image {tuple(spec.image_shape)}, {spec.num_classes} classes')
    return 'complete', f'{version_dir} holds splits {have}'


def import_dataset(
    source: str | None,
    name: str,
    data_dir: str,
    *,
    overwrite: bool = False,
    channels: int | None = None,
    test_fraction: float = 0.1,
    progress: bool = False,
) -> str:
    """Writes `source` as the TFDS dataset `name` into `data_dir`.

    Args:
      source: .npz path, image folder, or None for digits.
      name: TFDS name.
      data_dir: TFDS data_dir (local path or gs://...).
      overwrite: replace an existing different/incomplete (or complete) dataset.
      channels: channels for non-catalog datasets (default from the source).
      test_fraction: test share for folders without train/test sub-folders.
      progress: show TFDS progress bars.

    Returns:
      'exists' if a complete identical dataset was already there (nothing done),
      'imported' otherwise.

    Raises:
      FileExistsError: an incomplete or different dataset is in the way and
        overwrite is False.
      ImportSourceError: bad source data.
    """
    src = make_source(source, name, channels=channels, test_fraction=test_fraction)
    spec = src.spec
    state, detail = existing_state(data_dir, spec, src.counts)
    if state == 'complete' and not overwrite:
        logging.info('Dataset %s %s already complete (%s): nothing to do.', name, spec.version, detail)
        return 'exists'
    if state != 'absent':
        if not overwrite:
            raise FileExistsError(f'Not importing {name}: {detail}. Pass --overwrite to replace it.')
        version_dir = epath.Path(data_dir) / name / spec.version
        logging.warning('Removing %s (--overwrite).', version_dir)
        version_dir.rmtree()
        for palette in (epath.Path(data_dir) / name).glob('palette_*.npy'):
            logging.warning('Removing %s, fitted on the replaced data.', palette)
            palette.unlink()
    tfds.display_progress_bar(progress)
    builder = builders.make_builder(spec, src.examples, data_dir)
    with tempfile.TemporaryDirectory(prefix='igpt_import_') as tmp:
        builder.download_and_prepare(download_dir=tmp)
    got = {s: builder.info.splits[s].num_examples for s in builder.info.splits.keys()}
    if got != src.counts:
        raise RuntimeError(f'Import of {name} wrote {got} examples, expected {src.counts}.')
    logging.info('Imported %s (%s) into %s: %s', name, src.description, builder.data_dir, got)
    return 'imported'


# ---------------------------------------------------------------------- CLI
def _define_flags() -> None:
    """CLI flags, defined only when run as a program (importing must not add global flags)."""
    flags.DEFINE_string('source', None, '.npz archive or image folder; omit for --name=digits.')
    flags.DEFINE_string('name', None, 'TFDS dataset name (cifar10, fashion_mnist, digits, ...).')
    flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).')
    flags.DEFINE_bool('overwrite', False, 'Replace an existing different or incomplete dataset.')
    flags.DEFINE_integer('channels', None, 'Channels to store (non-catalog datasets): 1 or 3.')
    flags.DEFINE_float('test_fraction', 0.1, 'Test share for folders without train/test.')


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if not f.name:
        raise app.UsageError('--name is required.')
    data_dir = resolve_data_dir(f.data_dir)
    try:
        status = import_dataset(f.source, f.name, data_dir, overwrite=f.overwrite, channels=f.channels,
                                test_fraction=f.test_fraction, progress=True)
    except (ImportSourceError, FileExistsError, ValueError) as err:  # bad input: one line, no traceback
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    print(f'{f.name}: {"already complete, nothing to do" if status == "exists" else "imported"} ({data_dir})')


if __name__ == '__main__':
    sys.argv[0] = 'igpt_jax.data.import_data'  # --help names the module, not this file's path on this machine
    _define_flags()
    app.run(main)
