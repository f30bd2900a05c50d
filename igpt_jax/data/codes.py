"""TFDS datasets of VQ-VAE codes (written by the tokenize job, read with ``data.tokens='codes'``).

A dataset of codes has the splits of its source dataset, in the source's record order (the writer does not
shuffle), so the validation cut (the last ``val_fraction`` of train) holds the same images as the source's.
Features: ``codes`` uint16 [g, g] (the code grid, row-major = the token sequence), ``label`` (the source's class
names) and ``id`` (the source record's index in its split). Its metadata (``metadata.json`` next to the records)
says how it was made: vocab_size, grid, the source dataset and resolution, the VQ-VAE run and step.

Reading one (`check_codes_dataset`) checks that metadata against the config; `code_palette` is the stand-in palette
that jobs keep with a model trained on codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from igpt_jax.data import builders, records
from igpt_jax.data.palette import Palette


class CodesDatasetBuilder(builders.ImageDatasetBuilder, skip_registration=True):
    """An array_record builder of code grids; `spec.image_shape` is (g, g, 1); `metadata` goes to metadata.json."""

    def __init__(self, *, metadata: dict[str, Any], **kwargs: Any):
        self._metadata = metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        grid = self._spec.image_shape[0]
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._spec.description,
            features=tfds.features.FeaturesDict({
                'codes': tfds.features.Tensor(shape=(grid, grid), dtype=np.uint16),
                'label': tfds.features.ClassLabel(names=list(self._spec.label_names)),
                'id': tfds.features.Text(),
            }),
            supervised_keys=('codes', 'label'),
            homepage=self._spec.homepage or None,
            citation=self._spec.citation or None,
            metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # keep the source's record order
        )


def write_codes_dataset(*, name: str, data_dir: str, grid: int, label_names: tuple[str, ...],
                        splits: dict[str, Callable[[], Iterable[tuple[int, np.ndarray, int]]]],
                        metadata: dict[str, Any], description: str, homepage: str = '',
                        citation: str = '') -> str:
    """Writes the dataset; `splits` maps a TFDS split to a function yielding (index, codes [g, g], label).

    Returns:
      The dataset's directory (data_dir/name/1.0.0).
    """
    spec = builders.DatasetSpec(name=name, version='1.0.0', image_shape=(grid, grid, 1), label_names=label_names,
                                id_feature='id', splits=tuple(splits), description=description,
                                homepage=homepage, citation=citation)

    def examples(gen):
        def make():
            for index, codes, label in gen():
                if codes.max(initial=0) >= metadata['vocab_size']:
                    raise ValueError(f'code {codes.max()} is outside the vocabulary of {metadata["vocab_size"]}')
                yield index, {'codes': codes.astype(np.uint16), 'label': int(label), 'id': str(index)}
        return make

    builder = builders.make_builder(spec, {split: examples(gen) for split, gen in splits.items()}, data_dir,
                                    base=_with_metadata(metadata))
    builder.download_and_prepare()
    return str(builder.data_dir)


def _with_metadata(metadata: dict[str, Any]) -> type[CodesDatasetBuilder]:
    class _Builder(CodesDatasetBuilder, skip_registration=True):
        def __init__(self, **kwargs: Any):
            super().__init__(metadata=metadata, **kwargs)
    return _Builder


def code_palette(k: int) -> Palette:
    """The stand-in palette of a dataset of codes: code i -> grey level i / (k - 1) in [-1, 1]. Jobs that keep a
    palette with the model (checkpoints, probes) keep this one; it only says how many tokens there are."""
    return Palette(np.linspace(-1.0, 1.0, k, dtype=np.float32)[:, None])


def check_codes_dataset(data_cfg: ml_collections.ConfigDict,
                        builder: tfds.core.DatasetBuilder | None = None) -> dict[str, Any]:
    """The metadata of a dataset of codes, checked against data.n_colors and data.resolution.

    Raises:
      ValueError: the dataset holds no codes, or a vocabulary or grid other than the config's.
    """
    builder = builder or records.dataset_builder(data_cfg)
    meta = dict(builder.info.metadata or {})
    if 'codes' not in builder.info.features or 'vocab_size' not in meta:
        raise ValueError(f'data.tokens=codes but dataset {data_cfg.name!r} holds no VQ-VAE codes (features '
                         f'{sorted(builder.info.features.keys())}); write one with the tokenize job.')
    if int(meta['vocab_size']) != int(data_cfg.n_colors):
        raise ValueError(f'dataset {data_cfg.name!r} holds codes of a {meta["vocab_size"]}-code VQ-VAE but '
                         f'data.n_colors={data_cfg.n_colors} (the model\'s vocabulary): set both to '
                         f'{meta["vocab_size"]}.')
    if int(meta['grid']) != int(data_cfg.resolution):
        raise ValueError(f'dataset {data_cfg.name!r} holds {meta["grid"]}x{meta["grid"]} code grids but '
                         f'data.resolution={data_cfg.resolution}.')
    return meta
