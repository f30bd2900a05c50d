"""TFDS builders that write image datasets as array_record, without TensorFlow.

One builder class serves every dataset: :func:`make_builder` gives it the
TFDS name, version and features of a :class:`DatasetSpec` and a generator of
examples per split. Catalog datasets keep the names, versions and features of
the TFDS catalog, so a data_dir prepared here and one prepared by TFDS on a
connected machine are interchangeable:

  * ``cifar10`` 3.0.2: id (Text, 'train_00042'), image (32, 32, 3), label (10).
  * ``fashion_mnist`` 3.0.1: image (28, 28, 1), label (10 names).
  * ``imagenet2012`` 5.1.0: file_name, image (None, None, 3) JPEG, label (1000
    synsets in TFDS's order); splits train and validation.

Ours: ``digits`` 1.0.0 (scikit-learn's bundled 8x8 digits, 1500 train / 297
test, grey levels 0..16 scaled to 0..255), and any other name (1.0.0) with
features id, image, label taken from the source.

Like TFDS's own builders, examples are keyed by their index in the official
order (a file's relative path for folders); TFDS stores records in a
deterministic order of the hashed keys, so the ``id`` feature (where the
catalog has one) recovers the official order.

Images are handed to TFDS as encoded bytes (PNG for arrays, the original file
bytes for PNG/JPEG files): encoding numpy arrays inside TFDS would need TF.
"""

from __future__ import annotations

import dataclasses
import io
import re
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

Example = dict[str, Any]
ExampleGen = Callable[[], Iterable[tuple[Any, Example]]]

CIFAR10_LABELS = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck',
)
FASHION_MNIST_LABELS = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


def imagenet2012_labels() -> tuple[str, ...]:
    """The 1000 ImageNet synsets in TFDS's label order (shipped with tensorflow_datasets)."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top

    with open(imagenet_common.label_names_file()) as f:
        return tuple(line.strip() for line in f if line.strip())


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Name, version and features of an image classification dataset.

    Attributes:
      name: TFDS name (snake_case).
      version: TFDS version string.
      image_shape: (H, W, C); H and W may be None (variable size).
      label_names: class names (their count is the number of classes).
      id_feature: name of a Text feature identifying the example ('id',
        'file_name') or None.
      splits: the TFDS splits written, (train split, test split).
      encoding: Image feature encoding format ('png' or 'jpeg').
      catalog: True for datasets of the TFDS catalog (features fixed).
      description, homepage, citation: DatasetInfo metadata.
    """

    name: str
    version: str
    image_shape: tuple[int | None, int | None, int]
    label_names: tuple[str, ...]
    id_feature: str | None = 'id'
    splits: tuple[str, str] = ('train', 'test')
    encoding: str = 'png'
    catalog: bool = False
    description: str = ''
    homepage: str = ''
    citation: str = ''

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def channels(self) -> int:
        return int(self.image_shape[-1])

    def features(self) -> tfds.features.FeaturesDict:
        """The TFDS FeaturesDict of this dataset."""
        feats: dict[str, tfds.features.FeatureConnector] = {
            'image': tfds.features.Image(shape=self.image_shape, encoding_format=self.encoding),
            'label': tfds.features.ClassLabel(names=list(self.label_names)),
        }
        if self.id_feature:
            feats[self.id_feature] = tfds.features.Text()
        return tfds.features.FeaturesDict(feats)


_CIFAR10_CITATION = """\
@TECHREPORT{Krizhevsky09learningmultiple,
    author = {Alex Krizhevsky},
    title = {Learning multiple layers of features from tiny images},
    institution = {},
    year = {2009}
}"""
_FASHION_MNIST_CITATION = """\
@article{DBLP:journals/corr/abs-1708-07747,
  author    = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title     = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  journal   = {CoRR},
  volume    = {abs/1708.07747},
  year      = {2017},
}"""
_DIGITS_CITATION = """\
@misc{alpaydin1998digits,
  author = {E. Alpaydin and C. Kaynak},
  title = {Optical Recognition of Handwritten Digits},
  howpublished = {UCI Machine Learning Repository},
  year = {1998},
}"""


def catalog_spec(name: str) -> DatasetSpec | None:
    """The fixed spec of a catalog dataset (or of our digits), else None."""
    if name == 'cifar10':
        return DatasetSpec(
            name='cifar10', version='3.0.2', image_shape=(32, 32, 3), label_names=CIFAR10_LABELS,
            id_feature='id', catalog=True,
            description='The CIFAR-10 dataset consists of 60000 32x32 colour images in 10 classes, '
            'with 6000 images per class. There are 50000 training images and 10000 test images.',
            homepage='https://www.cs.toronto.edu/~kriz/cifar.html', citation=_CIFAR10_CITATION,
        )
    if name == 'fashion_mnist':
        return DatasetSpec(
            name='fashion_mnist', version='3.0.1', image_shape=(28, 28, 1),
            label_names=FASHION_MNIST_LABELS, id_feature=None, catalog=True,
            description="Fashion-MNIST is a dataset of Zalando's article images consisting of a "
            'training set of 60,000 examples and a test set of 10,000 examples. Each example is a '
            '28x28 grayscale image, associated with a label from 10 classes.',
            homepage='https://github.com/zalandoresearch/fashion-mnist', citation=_FASHION_MNIST_CITATION,
        )
    if name == 'imagenet2012':
        return DatasetSpec(
            name='imagenet2012', version='5.1.0', image_shape=(None, None, 3),
            label_names=imagenet2012_labels(), id_feature='file_name', splits=('train', 'validation'),
            encoding='jpeg', catalog=True, homepage='https://image-net.org/',
            description='ILSVRC 2012, aka ImageNet (imported from local folders).',
        )
    if name == 'digits':
        return DatasetSpec(
            name='digits', version='1.0.0', image_shape=(8, 8, 1),
            label_names=tuple(str(i) for i in range(10)), id_feature='id',
            description="scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set): "
            '1797 images, grey levels 0..16 scaled to 0..255; first 1500 train, last 297 test.',
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
            citation=_DIGITS_CITATION,
        )
    return None


def check_name(name: str) -> None:
    """Raises ValueError unless `name` is a valid TFDS dataset name."""
    if not _NAME_RE.match(name):
        raise ValueError(f'Invalid dataset name {name!r}: use lowercase letters, digits and _ (e.g. my_photos).')


class ImageDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the splits of a :class:`DatasetSpec` from in-memory example generators.

    Use :func:`make_builder`, which gives each dataset its own subclass carrying
    the TFDS name and version.
    """

    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, spec: DatasetSpec, examples: dict[str, ExampleGen], **kwargs: Any):
        self._spec = spec
        self._examples = examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._spec.description,
            features=self._spec.features(),
            supervised_keys=('image', 'label'),
            homepage=self._spec.homepage or None,
            citation=self._spec.citation or None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[Any, Example]]]:
        del dl_manager  # nothing is downloaded.
        return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split: str) -> Iterator[tuple[Any, Example]]:
        yield from self._examples[split]()


def make_builder(
    spec: DatasetSpec, examples: dict[str, ExampleGen], data_dir: str,
    base: type[ImageDatasetBuilder] | None = None,
) -> ImageDatasetBuilder:
    """An array_record builder for `spec` writing into `data_dir`/name/version.

    Args:
      spec: name, version, features.
      examples: split name -> function returning an iterable of (key, example);
        examples are dicts with 'image' (encoded bytes), 'label' (int) and the id
        feature if the spec has one.
      data_dir: TFDS data_dir.
      base: the builder class to derive from (default ImageDatasetBuilder; the
        tokenize job's has other features).
    """
    check_name(spec.name)
    camel = ''.join(part.capitalize() for part in spec.name.split('_')) or 'Dataset'

    def body(ns: dict[str, Any]) -> None:
        ns['name'] = spec.name
        ns['VERSION'] = tfds.core.Version(spec.version)
        ns['__module__'] = __name__

    cls = types.new_class(camel, (base or ImageDatasetBuilder,), {'skip_registration': True}, body)
    return cls(spec=spec, examples=examples, data_dir=data_dir, file_format='array_record')


# ----------------------------------------------------------------- encoding
def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C in 1, 3, 4) -> PNG bytes."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    pil.save(buf, format='PNG')
    return buf.getvalue()


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Converts uint8 [H, W] / [H, W, 1|3|4] to [H, W, channels].

    Grey -> RGB replicates the channel; RGBA drops alpha (as TF's and TFDS's
    ``decode_png(channels=3)`` do); RGB -> grey uses ITU-R 601-2 luma (Pillow's 'L').
    """
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 4:
        image, c = image[..., :3], 3
        if channels == 3:
            return image
    if c == 2:  # grey + alpha
        image, c = image[..., :1], 1
        if channels == 1:
            return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        return np.asarray(Image.fromarray(image).convert('L'), dtype=np.uint8)[..., None]
    raise ValueError(f'Cannot convert an image with {c} channels to {channels}.')


def decode_image(data: bytes, channels: int, min_side: int | None = None) -> np.ndarray:
    """Decodes PNG/JPEG/... bytes to uint8 [H, W, channels], converting the colour mode.

    Grey/palette images become RGB by replication, RGBA loses its alpha (as with
    TF's ``decode_image(channels=3)``), RGB becomes grey by ITU-R 601-2 luma.

    Args:
      data: encoded image.
      channels: 3 or 1.
      min_side: if given, JPEGs may be decoded at a reduced scale (libjpeg DCT
        scaling) as long as both sides stay >= min_side: much faster for large
        photos going to a small input resolution.

    Raises:
      Exception from Pillow if the bytes are not a decodable image.
    """
    target = 'RGB' if channels == 3 else 'L'
    with Image.open(io.BytesIO(data)) as img:
        if min_side and img.format == 'JPEG':
            img.draft(target, (min_side, min_side))
        if img.mode != target:
            if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
            img = img.convert(target)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr
