"""Batched, sharded feature extraction from a pretrained model (loaded with `igpt_jax.pretrained.sources`).

`FeatureExtractor` runs the model once per split over the evaluation iterator (in order, padded last batch) and
returns every requested layer's sequence-mean feature at once: entry l < L is the mean of block l's ``ln_1`` output
(the paper's probe feature, 2.4), entry L the mean of ``ln_f``'s output (the fine-tuning feature); with
``pooling='quadrants'`` each is the concatenated means of the token grid's four quadrants instead. BERT models see
masked inputs as in training; each example's mask is a function of (seed, mask number, record index), so features do
not depend on the batch size or the number of processes, and several masks are extracted in the same pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from igpt_jax import sharding
from igpt_jax.data import iterators, multihost, records
from igpt_jax.data.palette import Palette
from igpt_jax.models import objectives
from igpt_jax.models.igpt import IGPT, ModelConfig, pool_grid
from igpt_jax.models.layout import Layout
from igpt_jax.probing import token_store as store_lib

# ------------------------------------------------------------------------------------------------ extraction


def bert_masks(key: jax.Array, index: jax.Array, length: int, rate: float) -> jax.Array:
    """One BERT mask per example, a function of (key, record index) only: bool [batch, length]."""
    index = jnp.maximum(index, 0)  # padding rows (-1) get any valid mask
    return jax.vmap(lambda i: objectives.sample_bert_mask(jax.random.fold_in(key, i), (length,), rate))(index)


def mask_key(seed: int, mask: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), mask)


# How a layer's per-position features become one vector (``config.probe.pooling``): the `IGPT` feature_grid.
POOLINGS = {"mean": 1, "quadrants": 2}


def pooling_grid(pooling: str, length: int | None = None) -> int:
    """The model's ``feature_grid`` for a ``probe.pooling`` name.

    Raises:
      ValueError: for an unknown name, or a grid that does not divide the square token grid of ``length`` tokens.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"probe.pooling={pooling!r}: expected one of {sorted(POOLINGS)}")
    grid = POOLINGS[pooling]
    if length is not None and grid > 1:
        side = math.isqrt(length)
        if side * side != length or side % grid:
            raise ValueError(f"probe.pooling={pooling!r} needs a square token grid whose side {grid} divides; the "
                             f"model has {length} tokens per image")
    return grid


# Which token features the extraction pass also returns for the attentive probe (``FeatureExtractor(tokens=...)``):
# none, every probed layer's, or the average of the probed layers' (``probe.average_layers``, AIM's).
TOKEN_SETS = (None, "each", "average")


def _token_outputs(layer_tokens: jax.Array, token_sets: str, feature_grid: int) -> tuple[jax.Array, jax.Array]:
    """From the probed layers' tokens [b, layers, t, d] (float32): their pooled features [b, layers, d * grid^2]
    (the very `pool_grid` of the model's pooled pass) and the token features' bfloat16 bits [b, sets, t, d]."""
    pooled = jax.vmap(lambda h: pool_grid(h, feature_grid), in_axes=1, out_axes=1)(layer_tokens)
    sets = jnp.mean(layer_tokens, axis=1, keepdims=True) if token_sets == "average" else layer_tokens
    return pooled, store_lib.bits_in_jax(sets)


def features_fn(model_cfg: ModelConfig, layers: Sequence[int], *, num_masks: int, seed: int, feature_grid: int = 1,
                token_sets: str | None = None):
    """The pure extraction step: (params, batch) -> features [masks, batch, layers, d * feature_grid^2], NLL sum
    and count (under the first mask), and the batch's label, mask, index and tokens.

    A prefix-causal model (``model.mask='prefix'``) is read bidirectionally, the whole image its prefix (AIM's
    downstream use); that pass sees every target, so it scores no NLL (count 0: the split's loss is NaN).

    With ``token_sets`` ('each' or 'average', first mask only) the pass also returns ``token_features``: the bfloat16
    bits [batch, sets, length, d] of each probed layer's tokens or of their mean; the pooled features are then
    computed from the same tokens.
    """
    if token_sets not in TOKEN_SETS:
        raise ValueError(f"token_sets={token_sets!r}, expected one of {TOKEN_SETS}")
    layers = jnp.asarray(list(layers), jnp.int32)

    def fn(params, batch):
        tokens = batch["tokens"]
        feats, out = [], {}
        prefix = (jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32) if model_cfg.mask == "prefix" else None)
        for m in range(num_masks if model_cfg.objective == "bert" else 1):
            mask = None
            if model_cfg.objective == "bert":
                mask = bert_masks(mask_key(seed, m), batch["index"], tokens.shape[1], model_cfg.bert_mask_rate)
            scored = m == 0 and prefix is None
            res = IGPT(model_cfg).apply({"params": params}, tokens, bert_mask=mask, features=True, logits=scored,
                                        feature_grid=0 if token_sets else feature_grid, prefix_len=prefix)
            if token_sets:
                pooled, bits = _token_outputs(res.layer_features[:, layers], token_sets, feature_grid)
                feats.append(pooled)
                if m == 0:
                    out["token_features"] = bits
            else:
                feats.append(res.layer_features[:, layers])
            if m == 0 and not scored:
                out["nll_sum"] = out["count"] = jnp.zeros((), jnp.float32)
            elif m == 0:
                nll = objectives.token_nll(res.logits, tokens)
                weights = objectives.loss_weights(tokens, mask, batch["mask"])
                out["nll_sum"], out["count"] = jnp.sum(nll * weights), jnp.sum(weights)
        out["features"] = jnp.stack(feats)
        for k in ("label", "mask", "index", "tokens"):
            out[k] = batch[k]
        return out

    return fn


@dataclasses.dataclass
class SplitFeatures:
    """A split's features, in record order, padding removed."""

    features: np.ndarray  # float32 [masks, n, layers, d]
    labels: np.ndarray  # int32 [n]
    index: np.ndarray  # int32 [n]: the record index in the TFDS split
    tokens: np.ndarray  # int32 [n, length]
    loss: float  # mean NLL in nats per scored token (BERT: of the first mask's hidden tokens)
    token_store: store_lib.TokenStore | None = None  # the attentive probe's token features (on disk), if asked

    @property
    def n(self) -> int:
        return len(self.labels)


class FeatureExtractor:
    """Extracts the features of whole splits with one jitted, sharded forward pass per batch.

    Args:
      model_cfg: the model.
      layout: its parameters' layout on the mesh.
      mesh, rules: the mesh and the logical-axis rules.
      data_cfg: ``config.data``.
      palette: the checkpoint's palette.
      layers: layer ids (0..n_layer; n_layer = the final norm).
      batch_size: the GLOBAL batch (split over processes and the data-parallel axes).
      seed: seed of the BERT masks.
      pooling: ``probe.pooling``: 'mean' (the paper's sequence mean) or 'quadrants' (the mean of each quadrant of
        the token grid, concatenated: 4 x d features per layer).
      token_sets: None, or which token features `extract` also writes to disk for the attentive probe: 'each'
        probed layer's or their 'average' (`TOKEN_SETS`).
    """

    def __init__(self, model_cfg: ModelConfig, layout: Layout, mesh: Mesh, rules, data_cfg, palette: Palette,
                 layers: Sequence[int], *, batch_size: int, seed: int = 0, pooling: str = "mean",
                 token_sets: str | None = None):
        self.model_cfg, self.layout, self.mesh, self.rules = model_cfg, layout, mesh, rules
        self.data_cfg, self.palette, self.layers, self.seed = data_cfg, palette, list(layers), seed
        self.token_sets = token_sets
        self.feature_grid = pooling_grid(pooling, model_cfg.n_ctx)
        sharding.check_batch_divides(batch_size, mesh, rules, what="probe batch size")
        self.batch_size = batch_size
        self._fns: dict[int, Any] = {}

    def _fn(self, num_masks: int):
        if num_masks not in self._fns:
            fn = features_fn(self.model_cfg, self.layers, num_masks=num_masks, seed=self.seed,
                             feature_grid=self.feature_grid, token_sets=self.token_sets)
            self._fns[num_masks] = jax.jit(
                fn, in_shardings=(self.layout.shardings, sharding.batch_sharding(self.mesh, self.rules)),
                out_shardings=sharding.replicated(self.mesh))
        return self._fns[num_masks]

    def _token_writer(self, path: str | None, split: str, max_examples: int
                      ) -> tuple[store_lib.StoreWriter | None, int]:
        """The split's token store writer (None without ``token_sets``) and the split's first record index."""
        if not self.token_sets:
            return None, 0
        if path is None:
            raise ValueError("the extractor writes token features (token_sets): extract() needs a token_path")
        _, start, stop = records.split_bounds(self.data_cfg, split)
        n = min(stop - start, max_examples) if max_examples else stop - start
        sets = 1 if self.token_sets == "average" else len(self.layers)
        return store_lib.StoreWriter(path, n, sets, self.model_cfg.n_ctx, self.model_cfg.d_model), start

    def extract(self, params: Any, split: str, *, num_masks: int = 1, max_examples: int = 0,
                token_path: str | None = None, token_fingerprint: str = "") -> SplitFeatures:
        """Features of every example of `split` (or its first `max_examples` in record order).

        With ``token_sets``, the token features go to a new bfloat16 store at ``token_path`` (finished with
        ``token_fingerprint``: `igpt_jax.probing.token_store`), returned as the split's ``token_store``.
        """
        num_masks = num_masks if self.model_cfg.objective == "bert" else 1
        writer, first = self._token_writer(token_path, split, max_examples)
        rows = multihost.host_rows(self.batch_size, self.mesh, sharding.batch_axes(self.rules))
        it = iterators.make_iterator(self.data_cfg, split, batch_size=rows.size, train=False, seed=0,
                                     palette=self.palette, rows=rows)
        fn = self._fn(num_masks)
        keys = ("features", "label", "mask", "index", "tokens")
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        nll_sum = count = 0.0
        seen = 0
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for local in it:
                batch = multihost.make_global_batch(
                    {k: local[k] for k in ("tokens", "label", "mask", "index")}, self.mesh,
                    sharding.batch_axes(self.rules), rows)
                out = jax.device_get(fn(params, batch))
                if writer is not None:
                    real = np.asarray(out["mask"])
                    writer.write(np.asarray(out["index"])[real] - first, np.asarray(out["token_features"])[real],
                                 np.asarray(out["label"])[real])
                for k in keys:
                    chunks[k].append(np.asarray(out[k]))
                nll_sum += float(out["nll_sum"])
                count += float(out["count"])
                seen += int(np.sum(out["mask"]))
                if max_examples and seen >= max_examples:
                    break
        mask = np.concatenate(chunks["mask"])
        index = np.concatenate(chunks["index"])[mask]
        order = np.argsort(index, kind="stable")
        if max_examples:
            order = order[:max_examples]
        feats = np.concatenate(chunks["features"], axis=1)[:, mask][:, order]
        return SplitFeatures(
            features=feats.astype(np.float32), labels=np.concatenate(chunks["label"])[mask][order].astype(np.int32),
            index=index[order].astype(np.int32), tokens=np.concatenate(chunks["tokens"])[mask][order],
            loss=nll_sum / count if count else float("nan"),
            token_store=writer.finish(token_fingerprint) if writer is not None else None)


def pixel_features(tokens: np.ndarray, palette: Palette) -> np.ndarray:
    """The raw-pixel baseline's features: each token's palette colour in [-1, 1], flattened: [n, length * C]."""
    return palette.centres[np.asarray(tokens)].reshape(len(tokens), -1).astype(np.float32)


def resolve_layers(spec: Any, n_layer: int) -> list[int]:
    """``'all'`` -> 0..n_layer; ``'2,5,-1'`` (or a sequence) -> those ids, negative counted from n_layer + 1.

    Raises:
      ValueError: for an id outside [0, n_layer] (n_layer is the final norm).
    """
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "all"):
            return list(range(n_layer + 1))
        try:
            ids = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError as err:
            raise ValueError(f"probe.layers={spec!r}: expected 'all' or comma-separated layer ids") from err
    else:
        ids = [int(p) for p in spec]
    out = []
    for i in ids:
        j = i + n_layer + 1 if i < 0 else i
        if not 0 <= j <= n_layer:
            raise ValueError(f"probe.layers: layer {i} is outside [0, {n_layer}] (the model has {n_layer} blocks; "
                             f"{n_layer} is the final norm)")
        if j not in out:
            out.append(j)
    return sorted(out)


def layer_name(layer: int, n_layer: int) -> str:
    return "final norm (ln_f)" if layer == n_layer else f"block {layer} ln_1"


def approx_feature_bytes(n: int, layers: int, d: int, masks: int = 1) -> int:
    return int(n) * layers * d * masks * 4


def human_bytes(n: int) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"
