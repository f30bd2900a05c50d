"""Pretrained models for evaluation jobs: checkpoint loading onto the mesh, and batched, sharded feature extraction.

`load_pretrained` reads a pretraining run's checkpoint (a named step or the latest): its model config (checked
against the job's), its palette, and only its parameters (an Orbax partial restore: the optimizer state is never
read), placed directly into their shardings on the job's mesh.

`FeatureExtractor` runs the model once per split over the evaluation iterator (in order, padded last batch) and
returns every requested layer's sequence-mean feature at once: entry l < L is the mean of block l's ``ln_1`` output
(the paper's probe feature, 2.4), entry L the mean of ``ln_f``'s output (the fine-tuning feature). BERT models see
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
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import objectives, sharding
from igpt_jax.data import pipeline as data_pipeline
from igpt_jax.model import IGPT, ModelConfig, init_params
from igpt_jax.palette import Palette

# Fields that define the trained function: the job's config must agree with the checkpoint on these.
ARCHITECTURE_FIELDS = ("vocab_size", "n_ctx", "d_model", "n_head", "n_layer", "mlp_ratio", "objective",
                       "bert_mask_rate", "norm_eps", "param_dtype")
# Fields that only change how the function is computed: taken from the job's config.
RUNTIME_FIELDS = ("attention", "attention_block", "remat", "dtype", "scan_unroll", "dropout")


def model_config_for_job(job_model: Any, ckpt_model: Any, *, where: str) -> ModelConfig:
    """The model of a checkpoint, run with the job's runtime settings (attention kernel, remat, compute dtype).

    Raises:
      ValueError: when the job's ``config.model`` disagrees with the checkpoint's on an architecture field, naming
        each field, both values and the checkpoint.
    """
    ckpt_cfg = ModelConfig.from_config(ckpt_model)
    job = dict(job_model.items()) if hasattr(job_model, "items") else dict(job_model)
    diffs = [f"model.{name}: job config {job[name]!r}, checkpoint {getattr(ckpt_cfg, name)!r}"
             for name in ARCHITECTURE_FIELDS if name in job and job[name] != getattr(ckpt_cfg, name)]
    if diffs:
        raise ValueError(
            f"the job's model config disagrees with the checkpoint {where}: " + "; ".join(diffs)
            + ". Use the pretraining run's config file (or override these fields to the checkpoint's values)."
        )
    runtime = {name: job[name] for name in RUNTIME_FIELDS if name in job}
    return ckpt_cfg.replace(**runtime)


def check_data_fits_model(data_cfg: Any, model_cfg: ModelConfig, palette: Palette, *, where: str) -> None:
    """The dataset's tokens must be the model's: palette size = vocabulary, sequence no longer than the context."""
    if data_cfg.n_colors != model_cfg.vocab_size or palette.k != model_cfg.vocab_size:
        raise ValueError(
            f"data.n_colors={data_cfg.n_colors} (checkpoint palette: {palette.k} colours) differs from the model's "
            f"vocabulary {model_cfg.vocab_size} ({where})"
        )
    if palette.channels != data_cfg.channels:
        raise ValueError(
            f"the checkpoint's palette has {palette.channels} channel(s) but data.channels={data_cfg.channels} "
            f"({where})"
        )
    if data_cfg.resolution**2 > model_cfg.n_ctx:
        raise ValueError(
            f"data.resolution={data_cfg.resolution} gives {data_cfg.resolution**2} tokens, more than the model's "
            f"context n_ctx={model_cfg.n_ctx} ({where})"
        )


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    abstract: Any  # ShapeDtypeStructs with shardings
    shardings: Any


def param_layout(model_cfg: ModelConfig, mesh: Mesh, rules) -> ParamLayout:
    """Shapes and shardings of the model parameters on `mesh` (nothing allocated)."""
    boxed = jax.eval_shape(lambda rng: init_params(model_cfg, rng), jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return ParamLayout(abstract, shardings)


def random_params(model_cfg: ModelConfig, layout: ParamLayout, mesh: Mesh, rules, rng: jax.Array) -> Any:
    """Freshly initialised parameters (the random-weights baseline), created directly in their shardings."""
    init = jax.jit(lambda r: nn.meta.unbox(init_params(model_cfg, r)), out_shardings=layout.shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng)


@dataclasses.dataclass
class Pretrained:
    """A pretraining checkpoint, loaded."""

    step: int
    model_cfg: ModelConfig
    params: Any
    palette: Palette
    config: ml_collections.ConfigDict  # the pretraining run's config
    directory: str  # the checkpoint directory
    layout: ParamLayout


def open_source(config: ml_collections.ConfigDict, workdir: str) -> ckpt_lib.Checkpointer:
    """The Checkpointer of ``config.checkpoint.source_workdir`` (empty: the job's own workdir), read-only.

    Raises:
      FileNotFoundError: when the directory holds no checkpoint.
    """
    source = config.checkpoint.source_workdir or workdir
    ckpt = ckpt_lib.Checkpointer(source, create=False, async_save=False)
    if not ckpt.all_steps():
        ckpt.close()
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_lib.checkpoint_dir(source)} (config.checkpoint.source_workdir="
            f"{config.checkpoint.source_workdir!r}, workdir={workdir!r}): run the pretraining job there first, or "
            "point checkpoint.source_workdir at a pretraining run"
        )
    return ckpt


def read_model(ckpt: ckpt_lib.Checkpointer, step: int, job_config: ml_collections.ConfigDict
               ) -> tuple[ModelConfig, ml_collections.ConfigDict, Palette]:
    """The checkpoint's model (with the job's runtime settings), its run config and its palette."""
    where = f"{ckpt.directory}/{step}"
    run_config = ckpt.restore_config(step)
    if "model" not in run_config:
        raise ValueError(f"checkpoint {where} has no model config")
    model_cfg = model_config_for_job(job_config.model, run_config.model, where=where)
    palette = Palette(ckpt.restore_palette(step))
    return model_cfg, run_config, palette


def restore_params(ckpt: ckpt_lib.Checkpointer, step: int, layout: ParamLayout, *, key: str = "params") -> Any:
    """Only the parameters of a saved train state (Orbax partial restore), in the layout's shardings."""
    item = {key: layout.abstract}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    try:
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(**{
            ckpt_lib.STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)}))
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"cannot restore the model parameters of checkpoint {ckpt.directory}/{step}: {err}. Is it a pretraining "
            "checkpoint of this model?"
        ) from err
    return restored[ckpt_lib.STATE][key]


def load_pretrained(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, *,
                    step: int | None = None, ckpt: ckpt_lib.Checkpointer | None = None) -> Pretrained:
    """Loads a pretraining checkpoint's parameters onto `mesh` (see `open_source`, `model_config_for_job`).

    Args:
      config: the job's config (``checkpoint.source_workdir``, ``checkpoint.step``, ``model``).
      workdir: the job's workdir (the source when ``source_workdir`` is empty).
      mesh, rules: where the parameters go.
      step: the step (default ``config.checkpoint.step``; -1 = latest).
      ckpt: an already opened source Checkpointer.
    """
    own = ckpt is None
    ckpt = ckpt or open_source(config, workdir)
    try:
        step = ckpt_lib.resolve_step(ckpt, int(config.checkpoint.step if step is None else step))
        model_cfg, run_config, palette = read_model(ckpt, step, config)
        layout = param_layout(model_cfg, mesh, rules)
        params = restore_params(ckpt, step, layout)
        return Pretrained(step, model_cfg, params, palette, run_config, str(ckpt.directory), layout)
    finally:
        if own:
            ckpt.close()


# ------------------------------------------------------------------------------------------------ extraction


def bert_masks(key: jax.Array, index: jax.Array, length: int, rate: float) -> jax.Array:
    """One BERT mask per example, a function of (key, record index) only: bool [batch, length]."""
    index = jnp.maximum(index, 0)  # padding rows (-1) get any valid mask
    return jax.vmap(lambda i: objectives.sample_bert_mask(jax.random.fold_in(key, i), (length,), rate))(index)


def mask_key(seed: int, mask: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), mask)


def features_fn(model_cfg: ModelConfig, layers: Sequence[int], *, num_masks: int, seed: int):
    """The pure extraction step: (params, batch) -> features [masks, batch, layers, d], NLL sum and count (under
    the first mask), and the batch's label, mask, index and tokens."""
    layers = jnp.asarray(list(layers), jnp.int32)

    def fn(params, batch):
        tokens = batch["tokens"]
        feats, out = [], {}
        for m in range(num_masks if model_cfg.objective == "bert" else 1):
            mask = None
            if model_cfg.objective == "bert":
                mask = bert_masks(mask_key(seed, m), batch["index"], tokens.shape[1], model_cfg.bert_mask_rate)
            res = IGPT(model_cfg).apply({"params": params}, tokens, bert_mask=mask, features=True, logits=m == 0)
            feats.append(res.layer_features[:, layers])
            if m == 0:
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
    """

    def __init__(self, model_cfg: ModelConfig, layout: ParamLayout, mesh: Mesh, rules, data_cfg, palette: Palette,
                 layers: Sequence[int], *, batch_size: int, seed: int = 0):
        self.model_cfg, self.layout, self.mesh, self.rules = model_cfg, layout, mesh, rules
        self.data_cfg, self.palette, self.layers, self.seed = data_cfg, palette, list(layers), seed
        sharding.check_batch_divides(batch_size, mesh, rules, what="probe batch size")
        self.batch_size = batch_size
        self._fns: dict[int, Any] = {}

    def _fn(self, num_masks: int):
        if num_masks not in self._fns:
            fn = features_fn(self.model_cfg, self.layers, num_masks=num_masks, seed=self.seed)
            self._fns[num_masks] = jax.jit(
                fn, in_shardings=(self.layout.shardings, sharding.batch_sharding(self.mesh, self.rules)),
                out_shardings=sharding.replicated(self.mesh))
        return self._fns[num_masks]

    def extract(self, params: Any, split: str, *, num_masks: int = 1, max_examples: int = 0) -> SplitFeatures:
        """Features of every example of `split` (or its first `max_examples` in record order)."""
        num_masks = num_masks if self.model_cfg.objective == "bert" else 1
        rows = data_pipeline.host_rows(self.batch_size, self.mesh, sharding.batch_axes(self.rules))
        it = data_pipeline.make_iterator(self.data_cfg, split, batch_size=rows.size, train=False, seed=0,
                                         palette=self.palette, rows=rows)
        fn = self._fn(num_masks)
        keys = ("features", "label", "mask", "index", "tokens")
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        nll_sum = count = 0.0
        seen = 0
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for local in it:
                batch = data_pipeline.make_global_batch(
                    {k: local[k] for k in ("tokens", "label", "mask", "index")}, self.mesh,
                    sharding.batch_axes(self.rules), rows)
                out = jax.device_get(fn(params, batch))
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
            loss=nll_sum / max(count, 1.0))


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
