"""The defaults every config file starts from: one place that lists every setting a job reads.

A config file in configs/ calls `base_config()`, changes what its model or experiment needs, and returns it; the
command line can then override any field (`--config.train.lr=3e-3`). The result is locked, so a misspelt field is
an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from igpt_jax import sharding
from igpt_jax.data.config import default_data_config  # noqa: F401  (re-exported for configs)
from igpt_jax.model import ModelConfig

# Paper Table 5 (autoregressive, 32x32x3): S 0.003, M 0.003, L 0.001; L at 48x48: 0.01. BERT: S 0.01, M 0.003, L 0.001.
PAPER_SIZES = {
    "s": dict(n_layer=24, d_model=512, n_head=8),
    "m": dict(n_layer=36, d_model=1024, n_head=8),
    "l": dict(n_layer=48, d_model=1536, n_head=16),
    "xl": dict(n_layer=60, d_model=3072, n_head=24),  # heads not published; 24 heads of 128
}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """`ModelConfig`'s fields and defaults as a ConfigDict."""
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields.update(overrides)
    ModelConfig(**fields)  # validate early
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    """All settings with their defaults (a small CPU-friendly model on the embedded digits dataset)."""
    c = ml_collections.ConfigDict()
    c.job = "pretrain"  # pretrain | probe | finetune | sample | evaluate | compile
    c.seed = 0

    c.model = model_config(vocab_size=16, n_ctx=64, d_model=64, n_head=4, n_layer=2, remat="none")
    c.data = default_data_config()

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, over all processes and devices
    c.train.num_steps = 1000
    c.train.lr = 3e-3
    c.train.warmup_steps = -1  # -1: one epoch of the training split (paper)
    c.train.schedule = "cosine"  # cosine (to 0) | constant (after warmup)
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 0.0  # 0: no clipping
    c.train.grad_accum_steps = 1  # micro-batches per step; exactly the same update as the full batch
    c.train.log_every = 10
    c.train.eval_every = 100  # validation loss every this many steps (0: never)
    c.train.eval_batches = 0  # 0: the whole validation split, exactly; >0: that many batches
    c.train.eval_batch_size = 0  # 0: the training batch size

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the remaining devices
    c.mesh.rules = sharding.DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.step = -1  # jobs that read a checkpoint: -1 = latest
    c.checkpoint.source_workdir = ""  # probe/finetune/sample/evaluate: the pretraining run's workdir
    return c


def paper_model(size: str, *, n_ctx: int, objective: str = "ar", **overrides) -> ml_collections.ConfigDict:
    """The paper's model of a size ('s', 'm', 'l', 'xl') at a context length."""
    return model_config(vocab_size=512, n_ctx=n_ctx, objective=objective, **PAPER_SIZES[size], **overrides)


def parse_arg(arg: str | None, **defaults):
    """Parses a config variant string such as ``runlocal,objective=bert,res=48`` (big_vision style).

    Bare words set a boolean default to True; ``key=value`` pairs are converted to the default's type.

    Raises:
      ValueError: for a key that has no default, naming the known keys.
    """
    values = dict(defaults)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, raw = part.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        if not sep:
            values[key] = True
        elif isinstance(defaults[key], bool):
            values[key] = raw.lower() in ("1", "true", "yes")
        else:
            values[key] = type(defaults[key])(raw)
    return ml_collections.ConfigDict(values)


def make_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a paper config to a few hundred CPU steps on CIFAR-10 (from ../shared/data), in place.

    Keeps the objective, resolution and vocabulary; a 4-layer, width-128 model, batch 16, 300 steps, warmup 30.
    """
    resolution = config.data.resolution
    config.data = default_data_config("cifar10")
    config.data.resolution = resolution
    config.model = model_config(
        vocab_size=config.data.n_colors, n_ctx=resolution**2, objective=config.model.objective,
        d_model=128, n_head=4, n_layer=4, remat="none",
    )
    config.train.batch_size = 16
    config.train.num_steps = 300
    config.train.warmup_steps = 30
    config.train.lr = 3e-3
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.checkpoint.every_steps = 100
