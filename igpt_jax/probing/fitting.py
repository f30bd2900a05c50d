"""Probes fitted to a model's extracted splits: the train, validation and test features of every probed layer.

`extract_splits` extracts the three splits (or finds them saved by `igpt_jax.probing.progress`), `probe_splits` fits
the per-layer probes of `igpt_jax.probing.linear_probe` to them, `pixel_baseline` fits the same probe to the model's
input pixels and `low_data` runs the low-data protocol (paper 4.7) on one layer. The probe job uses them for every
checkpoint and for its baselines; the benchmarks call them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from igpt_jax.data import records
from igpt_jax.data.palette import Palette
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.probing import progress as probe_progress

Splits = dict[str, features_lib.SplitFeatures]


def extract_splits(extractor: features_lib.FeatureExtractor, params: Any | Callable[[], Any], *, masks: int,
                   max_train: int = 0, progress: probe_progress.ProbeProgress | None = None, name: str = "",
                   fingerprint: str = "") -> Splits:
    """Features of train (one mask), validation and test (``masks`` masks for BERT), one pass per split.

    Args:
      extractor: the feature extractor of the model, data and layers.
      params: the parameters, or a function returning them (called only when a split is not in ``progress``).
      masks: BERT masks per validation and test example (1: autoregressive models).
      max_train: at most this many training examples (0: all).
      progress: where finished splits are saved (as ``{name}-{split}``) and found again.
      name: the model's name in ``progress`` (``step{N}``, ``random``).
      fingerprint: what determines the features (`igpt_jax.probing.progress.fingerprint`).

    Returns:
      split name -> its features.
    """
    out = {}
    for split in records.SPLITS:
        t0 = time.time()
        found = progress.load_features(f"{name}-{split}", fingerprint) if progress else None
        if found is not None:
            out[split] = found
            logging.info("features of %s: %d examples, reused from %s", split, found.n, progress.directory)
            continue
        if callable(params):
            params = params()
        out[split] = extractor.extract(params, split, num_masks=1 if split == "train" else masks,
                                       max_examples=max_train if split == "train" else 0)
        logging.info("features of %s: %d examples x %d layers x %d in %.1fs", split, out[split].n,
                     out[split].features.shape[2], out[split].features.shape[3], time.time() - t0)
        if progress:
            progress.save_features(f"{name}-{split}", fingerprint, out[split], seconds=time.time() - t0)
    return out


def probe_splits(splits: Splits, settings: linear_probe.ProbeSettings, *, num_classes: int, layers: list[int],
                 n_layer: int, concat_layers: int = 0) -> dict[str, Any]:
    """`linear_probe.probe` on extracted splits: every layer, the best on validation, refitted and tested."""
    tr, va, te = (splits[s] for s in records.SPLITS)
    return linear_probe.probe((tr.features, tr.labels), (va.features, va.labels), (te.features, te.labels), settings,
                              num_classes=num_classes, layers=layers, concat_layers=concat_layers,
                              layer_names=lambda l: features_lib.layer_name(l, n_layer))


def pixel_baseline(splits: Splits, palette: Palette, settings: linear_probe.ProbeSettings, *,
                   num_classes: int) -> dict[str, Any]:
    """Logistic regression on the model's input pixels (palette colours in [-1, 1]), same splits and solver."""
    px = {s: features_lib.pixel_features(splits[s].tokens, palette)[None, :, None, :] for s in splits}
    res = linear_probe.probe((px["train"], splits["train"].labels), (px["validation"], splits["validation"].labels),
                             (px["test"], splits["test"].labels), settings, num_classes=num_classes, layers=[0],
                             layer_names=lambda _: "raw pixels")
    best = res["best"]
    return {"features": int(px["train"].shape[-1]), settings.hyper_name: best[settings.hyper_name],
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"]}


def low_data(splits: Splits, position: int, settings: linear_probe.ProbeSettings, *, num_classes: int,
             budgets: Sequence[int], subsets: int) -> list[dict[str, Any]]:
    """`linear_probe.low_data` on the layer at `position` of the extracted layers (paper 4.7)."""
    tr, va, te = (splits[s] for s in records.SPLITS)
    return linear_probe.low_data((tr.features[0][:, position], tr.labels), (va.features[:, :, position], va.labels),
                                 (te.features[:, :, position], te.labels), settings, num_classes=num_classes,
                                 budgets=budgets, subsets=subsets)
