"""Probes fitted to a model's extracted splits: the train, validation and test features of every probed layer.

`extract_splits` extracts the three splits (or finds them saved by `igpt_jax.probing.progress`), `probe_splits` fits
the per-layer probes of `igpt_jax.probing.linear_probe` to them, `pixel_baseline` fits the same probe to the model's
input pixels and `low_data` runs the low-data protocol (paper 4.7) on one layer; the ``attentive_`` functions do
the same with the attentive head (`igpt_jax.probing.attentive`) on the splits' token features. The probe job uses
them for every checkpoint and for its baselines; the benchmarks call them directly.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from igpt_jax.data import records
from igpt_jax.data.palette import Palette
from igpt_jax.probing import attentive
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.probing import progress as probe_progress
from igpt_jax.probing import token_store

Splits = dict[str, features_lib.SplitFeatures]


def extract_splits(extractor: features_lib.FeatureExtractor, params: Any | Callable[[], Any], *, masks: int,
                   max_train: int = 0, progress: probe_progress.ProbeProgress | None = None, name: str = "",
                   fingerprint: str = "", token_dir: str = "") -> Splits:
    """Features of train (one mask), validation and test (``masks`` masks for BERT), one pass per split.

    Args:
      extractor: the feature extractor of the model, data and layers.
      params: the parameters, or a function returning them (called only when a split is not in ``progress``).
      masks: BERT masks per validation and test example (1: autoregressive models).
      max_train: at most this many training examples (0: all).
      progress: where finished splits are saved (as ``{name}-{split}``) and found again.
      name: the model's name in ``progress`` (``step{N}``, ``random``).
      fingerprint: what determines the features (`igpt_jax.probing.progress.fingerprint`).
      token_dir: where an extractor with ``token_sets`` writes each split's token features
        (``tokens-{name}-{split}.npy``); a finished store of the same fingerprint is reused with the saved features.

    Returns:
      split name -> its features (with ``token_store`` when the extractor writes tokens).
    """
    out = {}
    for split in records.SPLITS:
        t0 = time.time()
        token_path = os.path.join(token_dir, f"tokens-{name}-{split}.npy") if extractor.token_sets else None
        found = progress.load_features(f"{name}-{split}", fingerprint) if progress else None
        if found is not None and token_path:
            found.token_store = token_store.open_store(token_path, fingerprint) if progress.enabled else None
            found = found if found.token_store is not None else None
        if found is not None:
            out[split] = found
            logging.info("features of %s: %d examples, reused from %s", split, found.n, progress.directory)
            continue
        if callable(params):
            params = params()
        out[split] = extractor.extract(params, split, num_masks=1 if split == "train" else masks,
                                       max_examples=max_train if split == "train" else 0, token_path=token_path,
                                       token_fingerprint=fingerprint)
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


# ------------------------------------------------------------------------------------------------ attentive head


def attentive_probe(splits: Splits, settings: attentive.AttentiveSettings, *, num_classes: int, layers: list[int],
                    names: list[str]) -> dict[str, Any]:
    """`attentive.probe_sets` on the splits' token stores: one head per feature set, the best on validation."""
    tr, va, te = (splits[s].token_store for s in records.SPLITS)
    return attentive.probe_sets(tr, va, te, settings, num_classes=num_classes, layers=layers, names=names)


def attentive_low_data(splits: Splits, best: dict[str, Any], position: int, settings: attentive.AttentiveSettings,
                       *, num_classes: int, budgets: Sequence[int], subsets: int) -> list[dict[str, Any]]:
    """`attentive.low_data` on the feature set at `position` with the chosen head's learning rate and decay."""
    tr, va, te = (splits[s].token_store for s in records.SPLITS)
    return attentive.low_data(tr, va, te, position, settings, best, num_classes=num_classes, budgets=budgets,
                              subsets=subsets)


def pixel_tokens(tokens: np.ndarray, palette: Palette) -> np.ndarray:
    """The attentive head's raw-pixel tokens: each pixel's palette colour and its row and column one-hot (where it
    is, which a model's position embedding gives its tokens): float32 [n, length, channels + 2 * side]."""
    n, length = tokens.shape
    side = math.isqrt(length)
    colour = palette.centres[np.asarray(tokens)].reshape(n, length, -1)
    rows, cols = np.divmod(np.arange(length), side)
    place = np.concatenate([np.eye(side)[rows], np.eye(side)[cols]], axis=1).astype(np.float32)
    return np.concatenate([colour, np.broadcast_to(place, (n, length, 2 * side))], axis=2).astype(np.float32)


def attentive_pixel_baseline(splits: Splits, palette: Palette, settings: attentive.AttentiveSettings, *,
                             num_classes: int, token_dir: str, chunk: int = 1024) -> dict[str, Any]:
    """The attentive head on the input pixels (`pixel_tokens`, written to bfloat16 stores in ``token_dir``)."""
    stores = {}
    for split, feats in splits.items():
        width = pixel_tokens(feats.tokens[:1], palette).shape[-1]
        writer = token_store.StoreWriter(os.path.join(token_dir, f"tokens-pixels-{split}.npy"), feats.n, 1,
                                         feats.tokens.shape[1], width)
        for lo in range(0, feats.n, chunk):
            rows = np.arange(lo, min(lo + chunk, feats.n))
            writer.write(rows, token_store.to_bits(pixel_tokens(feats.tokens[rows], palette))[:, None],
                         feats.labels[rows])
        stores[split] = writer.finish("pixels")
    res = attentive.probe_sets(*(stores[s] for s in records.SPLITS), settings, num_classes=num_classes, layers=[0],
                               names=["raw pixels"])
    best = res["best"]
    return {"features": int(width), "lr": best["lr"], "weight_decay": best["weight_decay"], "epoch": best["epoch"],
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"]}
