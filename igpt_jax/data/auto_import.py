"""Datasets on first use: find a prepared TFDS dataset, or import it (digits, or ``{name}.npz`` found nearby).

This is the only place where reading data may trigger an import; `igpt_jax.data.records` calls `ensure_dataset`
before it opens a dataset, and `igpt_jax.data.import_data` (which writes datasets) does not depend on either.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
from absl import logging
from etils import epath

from igpt_jax.data import import_data
from igpt_jax.data.config import resolve_data_dir

# Where auto_import looks for {name}.npz when config.data.import_source is None.
NPZ_DIRS_ENV = 'IGPT_NPZ_DIR'
SHARED_DATA = Path(__file__).resolve().parents[3] / 'shared' / 'data'


def prepared_versions(name: str, data_dir: str) -> list[str]:
    """Versions of dataset `name` in `data_dir` that TFDS can read (those with a dataset_info.json)."""
    root = epath.Path(data_dir) / name
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / 'dataset_info.json').exists())


def auto_import_source(data_cfg: ml_collections.ConfigDict) -> str | None:
    """``data.import_source``, else ``{name}.npz`` in $IGPT_NPZ_DIR or the project's shared/data; None if none."""
    if data_cfg.get('import_source'):
        return data_cfg.import_source
    dirs = [d for d in os.environ.get(NPZ_DIRS_ENV, '').split(os.pathsep) if d] + [str(SHARED_DATA)]
    for d in dirs:
        candidate = Path(d) / f'{data_cfg.name}.npz'
        if candidate.is_file():
            return str(candidate)
    return None


def ensure_dataset(data_cfg: ml_collections.ConfigDict) -> str:
    """Makes sure the dataset is in data_dir (importing it if allowed); returns data_dir.

    Raises:
      FileNotFoundError: the dataset is missing and cannot be imported here.
    """
    data_dir = resolve_data_dir(data_cfg.data_dir)
    name = data_cfg.name
    if prepared_versions(name, data_dir):
        return data_dir
    hint = (f'Import it with: python -m igpt_jax.data.import_data --name={name} '
            f'--data_dir={data_dir} --source=<.npz or image folder>')
    if not data_cfg.get('auto_import', False):
        raise FileNotFoundError(f'Dataset {name!r} not found in {data_dir} (auto_import is off). {hint}')
    source = None if name == 'digits' else auto_import_source(data_cfg)
    if name != 'digits' and source is None:
        raise FileNotFoundError(f'Dataset {name!r} not found in {data_dir} and no source to import. {hint}')
    if jax.process_count() > 1:
        raise FileNotFoundError(
            f'Dataset {name!r} not found in {data_dir}; with {jax.process_count()} processes it must be '
            f'prepared before the run. {hint}')
    logging.info('Dataset %s not in %s: importing it from %s.', name, data_dir, source or 'scikit-learn')
    import_data.import_dataset(source, name, data_dir)
    return data_dir
