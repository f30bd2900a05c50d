"""The evaluate job: exact held-out negative log-likelihood of a pretraining checkpoint over a whole split.

Command:
  python -m igpt_jax.main --config=configs/demo.py --config.job=evaluate --workdir=workdirs/demo_eval \
      --config.checkpoint.source_workdir=workdirs/demo [--config.evaluate.split=test] [--config.checkpoint.step=600]

Every image of the split is scored once (the last batch is padded and its padding masked out), so the figure is
the exact mean over all tokens: nats per token and bits per token (nats / ln 2). For CIFAR-10 with a 512-colour
palette it is the same quantity as minGPT's test loss in ../shared/REFERENCE.md (2.0378 nats/token for a 12-layer,
width-256 model after 16 epochs). Writes ``eval_{split}.json`` to the job's workdir.

`load_checkpoint` is the shared start of the jobs that read a pretraining run (this one and `sample`): it finds
the step, takes the run's model and data settings and palette from the checkpoint, and restores only the
parameters, sharded on the job's mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import sharding, train
from igpt_jax.data import pipeline as data_pipeline
from igpt_jax.model import ModelConfig, abstract_params
from igpt_jax.palette import Palette
from igpt_jax.validation import evaluate as evaluate_split

# minGPT's CIFAR-10 image demo (../shared/REFERENCE.md): best test loss, nats per token, 512-colour palette.
MINGPT_CIFAR10_NATS = 2.0378


@dataclasses.dataclass
class Loaded:
    """What a job needs from a pretraining checkpoint, restored onto the job's mesh."""

    params: Any
    param_shardings: Any
    model_cfg: ModelConfig
    data_cfg: ml_collections.ConfigDict
    palette: Palette
    mesh: jax.sharding.Mesh
    rules: Any
    step: int
    source: str


def _as_dict(cfg: Any) -> dict[str, Any]:
    return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def _model_config(job_model: Any, run_model: Any, source: str) -> ModelConfig:
    """The checkpoint's model config; logs every field where the job's config.model says something else."""
    run = _as_dict(run_model)
    model_cfg = ModelConfig.from_config(run)
    job = _as_dict(job_model) if job_model is not None else {}
    diffs = {k: (job[k], v) for k, v in dataclasses.asdict(model_cfg).items() if k in job and job[k] != v}
    if diffs:
        listed = ", ".join(f"{k}: job {a!r} -> checkpoint {b!r}" for k, (a, b) in sorted(diffs.items()))
        logging.warning("config.model differs from the checkpoint's model in %s; using the checkpoint's (%s)",
                        source, listed)
        print(f"Note: using the checkpoint's model config, not the job's ({listed}).", flush=True)
    return model_cfg


def _data_config(job_data: Any, run_data: Any) -> ml_collections.ConfigDict:
    """The run's data settings; where the data lives (data_dir) may be overridden by the job's config."""
    data_cfg = ml_collections.ConfigDict(_as_dict(run_data))
    job_dir = job_data.get("data_dir") if job_data is not None else None
    if job_dir and job_dir != data_cfg.get("data_dir"):
        logging.info("data_dir: the job's %s instead of the run's %s", job_dir, data_cfg.get("data_dir"))
        data_cfg.data_dir = job_dir
    return data_cfg


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> Loaded:
    """Restores the parameters of ``config.checkpoint.source_workdir`` (or `workdir`) at ``config.checkpoint.step``.

    The run's own config (saved with the checkpoint) gives the model and data settings, and its palette the
    colours; the job's config gives the mesh.

    Raises:
      FileNotFoundError: naming the directory, when it holds no checkpoint (or not the named step).
    """
    source = str(config.checkpoint.source_workdir or workdir)
    ckpt = ckpt_lib.Checkpointer(source, create=False)
    try:
        step = ckpt_lib.resolve_step(ckpt, int(config.checkpoint.step))
        run_config = ckpt.restore_config(step)
        palette = Palette(ckpt.restore_palette(step))
        model_cfg = _model_config(config.get("model"), run_config.model, source)
        data_cfg = _data_config(config.get("data"), run_config.data)

        rules = sharding.rules_from_config(config.mesh.rules)
        mesh = sharding.make_mesh(config.mesh.shape, devices)
        boxed = abstract_params(model_cfg)
        shardings = sharding.logical_shardings(boxed, mesh, rules)
        abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                nn.meta.unbox(boxed), shardings)
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract)
        # Only the parameters: the optimizer state stays on disk.
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(**{ckpt_lib.STATE: ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)}))
        params = restored[ckpt_lib.STATE]["params"]
    finally:
        ckpt.close()
    logging.info("restored step %d of %s: %d layers, width %d, context %d, vocabulary %d, objective %s", step,
                 source, model_cfg.n_layer, model_cfg.d_model, model_cfg.n_ctx, model_cfg.vocab_size,
                 model_cfg.objective)
    return Loaded(params=params, param_shardings=shardings, model_cfg=model_cfg, data_cfg=data_cfg,
                  palette=palette, mesh=mesh, rules=rules, step=step, source=source)


def workpath_of(workdir: str) -> epath.Path:
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Scores every image of ``config.evaluate.split``; returns and writes the mean NLL.

    Returns:
      {'nll': nats per token, 'bits_per_token', 'tokens', 'images', 'split', 'step', 'source', 'dataset'}.
    """
    loaded = load_checkpoint(config, workdir, devices=devices)
    split = str(config.evaluate.split)
    if split not in data_pipeline.SPLITS:
        raise ValueError(f"evaluate.split={split!r}, expected one of {data_pipeline.SPLITS}")
    global_batch = int(config.evaluate.batch_size)
    sharding.check_batch_divides(global_batch, loaded.mesh, loaded.rules, what="evaluate.batch_size")
    model_cfg, data_cfg = loaded.model_cfg, loaded.data_cfg
    if data_cfg.resolution**2 > model_cfg.n_ctx:
        raise ValueError(f"data.resolution={data_cfg.resolution} gives {data_cfg.resolution**2} tokens, more than "
                         f"the model's context n_ctx={model_cfg.n_ctx}")

    eval_fn = jax.jit(
        lambda params, batch, rng: train.eval_step(params, batch, model_cfg=model_cfg, rng=rng),
        in_shardings=(loaded.param_shardings, sharding.batch_sharding(loaded.mesh, loaded.rules),
                      sharding.replicated(loaded.mesh)),
        out_shardings=sharding.replicated(loaded.mesh),
    )
    with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
        val = evaluate_split(eval_fn, loaded.params, data_cfg, split, global_batch=global_batch,
                                mesh=loaded.mesh, rules=loaded.rules, rng=jax.random.key(int(config.seed)),
                                palette=loaded.palette)
    tokens_per_image = data_cfg.resolution**2
    result = {
        "nll": val["nll"],
        "bits_per_token": val["bits_per_token"],
        "tokens": int(val["tokens"]),
        "images": int(round(val["tokens"] / tokens_per_image)),
        "split": split,
        "step": loaded.step,
        "source": loaded.source,
        "dataset": str(data_cfg.name),
        "objective": model_cfg.objective,
    }
    line = (f"{data_cfg.name} {split}: {result['nll']:.4f} nats/token ({result['bits_per_token']:.4f} bits/token) "
            f"over {result['tokens']:,} tokens of {result['images']:,} images, step {loaded.step} of {loaded.source}")
    if model_cfg.objective == "bert":
        line += " (BERT: loss over randomly masked positions only)"
    if data_cfg.name == "cifar10" and model_cfg.vocab_size == 512 and model_cfg.objective == "ar":
        line += f". minGPT's CIFAR-10 anchor (12 layers, width 256, 16 epochs): {MINGPT_CIFAR10_NATS} nats/token"
        result["reference_nll"] = MINGPT_CIFAR10_NATS
    logging.info("%s", line)
    print(f"Evaluation: {line}", flush=True)
    if jax.process_index() == 0:
        workpath = workpath_of(workdir)
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / f"eval_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
