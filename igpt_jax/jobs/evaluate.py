"""The evaluate job: exact held-out negative log-likelihood of a pretraining checkpoint over a whole split.

Command:
  python -m igpt_jax.main --config=configs/demo.py --config.job=evaluate --workdir=workdirs/demo_eval \
      --config.checkpoint.source_workdir=workdirs/demo [--config.evaluate.split=test] [--config.checkpoint.step=600]

Every image of the split is scored once (the last batch is padded and its padding masked out), so the figure is
the exact mean over all tokens: nats per token and bits per token (nats / ln 2). For CIFAR-10 with a 512-colour
palette it is the same quantity as minGPT's test loss in ../shared/REFERENCE.md (2.0378 nats/token for a 12-layer,
width-256 model after 16 epochs). Writes ``eval_{split}.json`` to the job's workdir.

The source is a pretraining run or a converted model (`igpt_jax.pretrained.sources`, which also states which settings
come from the source and which from the job).
"""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.data import records
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.training import step as train
from igpt_jax.training.validation import evaluate as evaluate_split
from igpt_jax.workdir import workpath_of

# minGPT's CIFAR-10 image demo (../shared/REFERENCE.md): best test loss, nats per token, 512-colour palette.
MINGPT_CIFAR10_NATS = 2.0378


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Scores every image of ``config.evaluate.split``; returns and writes the mean NLL.

    Returns:
      {'nll': nats per token, 'bits_per_token', 'tokens', 'images', 'split', 'step', 'source', 'source_kind',
      'dataset', 'objective'}, and 'reference_nll' for the CIFAR-10 setting of minGPT's anchor.
    """
    loaded = pretrained.load_on_mesh(config, workdir, devices=devices)
    split = str(config.evaluate.split)
    if split not in records.SPLITS:
        raise ValueError(f"evaluate.split={split!r}, expected one of {records.SPLITS}")
    global_batch = int(config.evaluate.batch_size)
    sharding.check_batch_divides(global_batch, loaded.mesh, loaded.rules, what="evaluate.batch_size")
    val = _score(loaded, split, global_batch, seed=int(config.seed))

    model_cfg, data_cfg = loaded.model_cfg, loaded.data_cfg
    result = {
        "nll": val["nll"],
        "bits_per_token": val["bits_per_token"],
        "tokens": int(val["tokens"]),
        "images": int(round(val["tokens"] / data_cfg.resolution**2)),
        "split": split,
        "step": loaded.step,
        "source": loaded.source,
        "source_kind": loaded.info.kind,
        "dataset": str(data_cfg.name),
        "objective": model_cfg.objective,
    }
    line = (f"{data_cfg.name} {split}: {result['nll']:.4f} nats/token ({result['bits_per_token']:.4f} bits/token) "
            f"over {result['tokens']:,} tokens of {result['images']:,} images, {loaded.info.describe()}")
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
        (workpath / workdir_files.eval_results(split)).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _score(loaded: pretrained.Pretrained, split: str, global_batch: int, *, seed: int) -> dict[str, Any]:
    """The exact mean NLL of every image of `split` (`igpt_jax.training.validation.evaluate`) on the model's mesh."""
    mesh, rules, model_cfg = loaded.mesh, loaded.rules, loaded.model_cfg
    eval_fn = jax.jit(
        lambda params, batch, rng: train.eval_step(params, batch, model_cfg=model_cfg, rng=rng),
        in_shardings=(loaded.layout.shardings, sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return evaluate_split(eval_fn, loaded.params, loaded.data_cfg, split, global_batch=global_batch, mesh=mesh,
                              rules=rules, rng=jax.random.key(seed), palette=loaded.palette)
