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
from igpt_jax.models.igpt import ModelConfig

AUTO = 0  # model.vocab_size / model.n_ctx (and data fields, see igpt_jax.data.config.AUTO): follow the data
MODEL_AUTO_FIELDS = ("vocab_size", "n_ctx")

# Paper Table 5 (autoregressive, 32x32x3): S 0.003, M 0.003, L 0.001; L at 48x48: 0.01. BERT: S 0.01, M 0.003, L 0.001.
PAPER_SIZES = {
    "s": dict(n_layer=24, d_model=512, n_head=8),
    "m": dict(n_layer=36, d_model=1024, n_head=8),
    "l": dict(n_layer=48, d_model=1536, n_head=16),
    "xl": dict(n_layer=60, d_model=3072, n_head=24),  # heads not published; 24 heads of 128
}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """`ModelConfig`'s fields and defaults as a ConfigDict; vocab_size and n_ctx default to AUTO (0).

    AUTO fields follow the data when the config is resolved (`igpt_jax.config.checks.resolve`): vocab_size is
    data.n_colors, n_ctx is data.resolution**2.
    """
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields.update(vocab_size=AUTO, n_ctx=AUTO)
    fields.update(overrides)
    ModelConfig(**{**fields, **{k: 1 for k in MODEL_AUTO_FIELDS if fields[k] == AUTO}})  # validate what is set
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    """All settings with their defaults (a small CPU-friendly model on the embedded digits dataset)."""
    c = ml_collections.ConfigDict()
    c.job = "pretrain"  # pretrain | probe | finetune | sample | evaluate | compile | vqvae | tokenize | lr_search
    c.seed = 0  # initialisation, training data order and augmentation, dropout and BERT masks
    # Jobs to run after `job` in the same command, each reading this run's checkpoint and writing to WORKDIR/<job>
    # (the demo: pretrain, then probe and sample).
    c.then = ()

    # The model (fields and meanings: igpt_jax/models/igpt.py ModelConfig). vocab_size 0: data.n_colors; n_ctx 0:
    # data.resolution**2.
    c.model = model_config(d_model=64, n_head=4, n_layer=2, remat="none")
    # The data (igpt_jax/data/config.py); resolution, channels, n_colors, augment and val_fraction at 0 / 'auto' / -1
    # follow data.name and the stored data.
    c.data = default_data_config("digits", auto=True)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, over all processes and devices
    c.train.num_steps = 1000  # optimizer steps in all (a resumed run continues to this many)
    c.train.lr = 3e-3  # peak learning rate (Adam)
    c.train.warmup_steps = -1  # -1: one epoch of the training split (paper)
    c.train.schedule = "cosine"  # cosine (to 0) | constant (after warmup)
    c.train.b1 = 0.9  # Adam beta1
    c.train.b2 = 0.95  # Adam beta2
    c.train.eps = 1e-8  # Adam epsilon
    c.train.weight_decay = 0.0  # >0: AdamW decoupled weight decay
    c.train.grad_clip_norm = 0.0  # 0: no clipping
    c.train.grad_accum_steps = 1  # micro-batches per step; exactly the same update as the full batch
    c.train.log_every = 10  # training metrics every this many steps
    c.train.eval_every = 100  # validation loss every this many steps (0: never)
    c.train.eval_batches = 0  # 0: the whole validation split, exactly; >0: that many batches
    c.train.eval_batch_size = 0  # 0: the training batch size

    c.mesh = ml_collections.ConfigDict()
    # (data, fsdp, context, tensor), or (data, fsdp, tensor) with context 1; one -1 fills the remaining devices.
    # 'context' splits each sequence (sequence parallelism, igpt_jax/sharding.py).
    c.mesh.shape = (-1, 1, 1)
    c.mesh.rules = sharding.DEFAULT_RULES  # (logical axis name, mesh axes) pairs; see igpt_jax/sharding.py

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200  # save every this many steps (and at the end, and on SIGTERM)
    c.checkpoint.max_to_keep = 3  # newest checkpoints kept
    c.checkpoint.async_save = True  # write checkpoints in the background while training goes on
    c.checkpoint.allow_changes = False  # resuming with changed train.* settings (lr, schedule, ...); see config_changes
    c.checkpoint.step = -1  # jobs that read a checkpoint: -1 = latest
    c.checkpoint.source_workdir = ""  # probe/finetune/sample/evaluate: a pretraining run or a converted model

    # Job 'compile': compile the train step ahead of time for a described TPU slice (needs `pip install libtpu`).
    c.compile = ml_collections.ConfigDict()
    c.compile.topology = ""  # e.g. 'v4:8x8x8' (v4-1024), 'v4:8x8x16', 'v3:32x32' (v3-2048), 'v5p:8x8x16'
    c.compile.chip_config = "auto"  # auto: 'megacore' on v4/v5p (one JAX device per chip), else 'default'
    c.compile.chips_per_host_bounds = ()  # e.g. (2, 2, 1); () = libtpu's default for the generation
    c.compile.num_slices = 1  # slices joined over DCN (multislice)
    c.compile.hbm_gib = 0.0  # HBM per JAX device; 0 = from the generation (v3 16 per core, v4 32, v5p 95 per chip)
    c.compile.headroom = 0.9  # fits when the step's peak memory is at most this fraction of the device's HBM
    c.compile.steps_per_epoch = 1  # no data is read: train.warmup_steps=-1 (one epoch) compiles as this many

    # Job 'sample': images from a checkpoint with a key/value cache (igpt_jax/jobs/sample.py).
    c.sample = ml_collections.ConfigDict()
    c.sample.mode = "complete"  # complete: finish images of a split from their top rows | unconditional: from SOS
    c.sample.num_samples = 16  # unconditional: how many images
    c.sample.split = "test"  # complete: the split whose first images are completed
    c.sample.num_images = 8  # complete: how many images of the split
    c.sample.given_rows = -1  # complete: rows given to the model; -1 = the top half
    c.sample.samples_per_image = 4  # complete: completions per image
    c.sample.temperature = 1.0  # 0 = greedy (argmax)
    c.sample.top_k = 0  # keep the k most likely colours at each step; 0 = off
    c.sample.seed = 0  # sampling randomness
    c.sample.batch_size = 32  # sequences decoded at once (global); rounded to the data-parallel size

    # Job 'evaluate': exact held-out NLL in nats and bits per token over a whole split (igpt_jax/jobs/evaluate.py).
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.split = "test"  # train | validation | test
    c.evaluate.batch_size = 128  # global; the last batch is padded and masked, so the mean is exact

    # Job 'lr_search' (paper 3.4): short pretraining runs down a ladder of learning rates, largest first, stopping at
    # the first local minimum of the final validation loss; each trial in WORKDIR/lr_<lr> (igpt_jax/jobs/lr_search.py).
    c.lr_search = ml_collections.ConfigDict()
    c.lr_search.lrs = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)  # peak learning rates, strictly descending (paper)
    c.lr_search.schedule_fraction = 0.1  # trial length: this fraction of train.num_steps (warmup, checkpoints too)

    # Linear probes (job 'probe', paper 2.4, 4.1-4.4, 4.7): features of every layer, one logistic regression each.
    c.probe = ml_collections.ConfigDict()
    c.probe.layers = "all"  # 'all' (0..n_layer; n_layer = the final norm) or comma-separated ids, e.g. '4,8,-1'
    c.probe.batch_size = 0  # global feature-extraction batch; 0: train.eval_batch_size, else train.batch_size
    # 'mean': each layer's feature is its sequence mean (the paper's); 'quadrants': the means of the token grid's four
    # quadrants, concatenated (4 x width features; keeps the coarse layout that a linear model on raw pixels sees)
    c.probe.pooling = "mean"
    # jax_lbfgs: scikit-learn's objective, full-batch L-BFGS in JAX, all layers in one compiled call (CIFAR/STL
    # in the paper);
    # lbfgs: scikit-learn itself (the reference, slower); sgd: JAX SGD (large datasets, ImageNet)
    c.probe.solver = "jax_lbfgs"
    c.probe.C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # jax_lbfgs/lbfgs: inverse L2 strengths searched on validation
    c.probe.C_widen = 4  # more C values per side while a feature set's best C is at the grid's edge (0: fixed grid)
    c.probe.C_bounds = (1e-6, 1e4)  # the widened grid stays inside these
    c.probe.max_iter = 1000  # jax_lbfgs/lbfgs iterations
    c.probe.standardize = True  # features standardised with the training split's mean and std
    c.probe.sgd_lrs = (30.0, 10.0, 3.0, 1.0)  # sgd: learning rates searched on validation (paper: 30, 10, 3, ...)
    c.probe.sgd_steps = 1000  # sgd: steps, cosine decay to 0
    c.probe.sgd_batch_size = 256  # sgd: batch of features per step
    c.probe.sgd_momentum = 0.9  # sgd: momentum
    c.probe.sgd_weight_decay = 0.0  # sgd: L2 penalty
    c.probe.concat_layers = 0  # >1: also probe this many layers centred on the best one, concatenated (paper: 11)
    c.probe.baselines = True  # also probe raw pixels and the same architecture with random weights
    c.probe.max_train_examples = 0  # 0: the whole training split
    c.probe.low_data_budgets = ()  # label budgets, e.g. (40, 250, 4000) on CIFAR-10 (paper 4.7)
    c.probe.low_data_subsets = 5  # random class-balanced subsets per budget
    c.probe.bert_ensemble = 5  # BERT models: masks per validation/test example, modal prediction (1: off)
    c.probe.checkpoint_steps = ()  # (): just checkpoint.step; several steps also plot accuracy vs validation loss
    c.probe.seed = 0  # BERT masks, random-init baseline, tie breaking, low-data subsets
    c.probe.resume = True  # save features per split and fitted probes in WORKDIR/progress; a rerun reuses them
    c.probe.plots = True  # probe_layers.png (and probe_vs_val_loss.png for several checkpoints)

    # Representation tracking while pretraining (igpt_jax/probing/tracking.py): every `every` steps, a probe of
    # every layer (JAX L-BFGS) on a fixed labelled subset; accuracies to TensorBoard, metrics.jsonl and tracking.png.
    c.track = ml_collections.ConfigDict()
    c.track.every = 0  # steps between evaluations (and at the last step); 0: off
    c.track.train_examples = 2000  # the probe is fitted on the first this many images of the training split
    c.track.val_examples = 1000  # C chosen and accuracy measured on the first this many validation images
    c.track.C = ()  # inverse L2 strengths; (): probe.C (widened at its edges by probe.C_widen, as the probe's)

    # Fine-tuning (job 'finetune', paper 2.3, 3.4, 4.5): a zero-initialised head on a sequence-mean feature.
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init = "pretrained"  # pretrained (from checkpoint.source_workdir) | random (from-scratch baseline)
    c.finetune.objective = "gen+clf"  # gen+clf: L_GEN + L_CLF (paper) | clf: L_CLF only
    c.finetune.head_layer = -1  # -1: mean of the final norm's output (paper); l: mean of block l's ln_1 output
    c.finetune.lr = 3e-4  # Adam (b1, b2, eps, clipping from config.train), constant after warmup (no cosine)
    c.finetune.warmup_steps = 0  # linear warmup steps
    c.finetune.num_steps = 1000  # fine-tuning steps
    c.finetune.batch_size = 0  # global; 0: train.batch_size
    c.finetune.eval_every = 100  # validation accuracy every this many steps (and at step 0); keeps the best
    c.finetune.eval_batch_size = 0  # global; 0: the fine-tuning batch size
    c.finetune.patience = 0  # early stop after this many evaluations without a better validation accuracy; 0: never
    c.finetune.dropout = 0.0  # residual/embedding dropout while fine-tuning (paper: none)
    c.finetune.num_classes = 0  # 0: the dataset's; otherwise it must equal the dataset's
    c.finetune.bert_ensemble = 5  # BERT models: masks per evaluation example, modal prediction (1: off)
    c.finetune.log_every = 10  # training metrics every this many steps

    # The VQ-VAE of paper A.2 (job 'vqvae', igpt_jax/jobs/vqvae.py) and the codes it writes (job 'tokenize').
    c.vqvae = ml_collections.ConfigDict()
    c.vqvae.data = default_data_config()  # the images it encodes (read as raw pixels in [-1, 1])
    c.vqvae.vocab_size = 512  # codebook size (paper: 4,096)
    c.vqvae.downsample = 1  # encoder blocks: 1 = 2x (32 -> 16, 96 -> 48), 2 = 4x (192 -> 48)
    c.vqvae.residual_layers = 1  # residual layers per block (32 hidden units each)
    c.vqvae.decay = 0.99  # EMA decay of the codebook's cluster sizes and sums
    c.vqvae.epsilon = 1e-5  # Laplace smoothing of the cluster sizes
    c.vqvae.commitment = 0.02  # paper A.2
    c.vqvae.dead_fraction = 0.1  # dead: EMA usage below this fraction of batch x grid / vocabulary (paper)
    c.vqvae.revive_noise = 0.01  # revived code = a random encoder output of the batch + this x std x N(0, 1)
    c.vqvae.lr = 1e-4  # Adam (paper A.2)
    c.vqvae.batch_size = 64  # global
    c.vqvae.num_steps = 1000  # training steps
    c.vqvae.log_every = 50  # training metrics every this many steps
    c.vqvae.data_variance = 0.0  # the reconstruction loss's divisor; 0: estimated from training images
    c.vqvae.variance_images = 1000  # images the estimate uses
    c.vqvae.eval_batch_size = 256  # test-split reconstruction error
    c.vqvae.grid_images = 8  # test images in reconstructions.png (0: none)
    c.tokenize = ml_collections.ConfigDict()
    c.tokenize.batch_size = 256  # images encoded at once
    return c


def paper_model(size: str, *, n_ctx: int = AUTO, objective: str = "ar", **overrides) -> ml_collections.ConfigDict:
    """The paper's model of a size ('s', 'm', 'l', 'xl') at a context length; the vocabulary is the palette's (512
    colours for the paper's datasets)."""
    return model_config(n_ctx=n_ctx, objective=objective, **PAPER_SIZES[size], **overrides)


def parse_arg(arg: str | None, **defaults):
    """Parses a config variant string such as ``runlocal,objective=bert,res=48`` (big_vision style).

    Bare words set a boolean default to True; ``key=value`` pairs are converted to the default's type. A config
    that takes no variant calls ``parse_arg(arg)``, so that any variant is an error.

    Raises:
      ValueError: one line, for a key that has no default (naming the known ones) or a value of the wrong type.
    """
    known = ", ".join(f"{k}" if isinstance(v, bool) else f"{k}={v}" for k, v in sorted(defaults.items()))
    takes = f"this config takes {known}" if defaults else "this config takes no variant"
    values = dict(defaults)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, raw = part.partition("=")
        if key not in defaults:
            raise ValueError(f"config variant {arg!r}: unknown argument {key!r}; {takes}")
        default = defaults[key]
        if isinstance(default, bool):
            if sep and raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config variant {arg!r}: {key}={raw!r} must be true or false")
            values[key] = not sep or raw.lower() in ("1", "true", "yes")
        elif not sep:
            raise ValueError(f"config variant {arg!r}: {key} needs a value, e.g. {key}={default}")
        else:
            try:
                values[key] = type(default)(raw)
            except ValueError:
                raise ValueError(f"config variant {arg!r}: {key}={raw!r} must be of type {type(default).__name__} "
                                 f"(default {default})") from None
    return ml_collections.ConfigDict(values)


def make_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a paper config to a few hundred CPU steps on CIFAR-10 (from ../shared/data), in place.

    Keeps the objective, resolution and vocabulary; a 4-layer, width-128 model, batch 16, 300 steps, warmup 30.
    """
    resolution = config.data.resolution
    config.data = default_data_config("cifar10", auto=True)
    config.data.resolution = resolution
    config.model = model_config(objective=config.model.objective, d_model=128, n_head=4, n_layer=4, remat="none")
    config.train.batch_size = 16
    config.train.num_steps = 300
    config.train.warmup_steps = 30
    config.train.lr = 3e-3
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.checkpoint.every_steps = 100
