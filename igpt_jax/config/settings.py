"""Every config field, declared once: its default, what it means and its role.

`base_config()` is built from this declaration, and every rule about fields reads it: ``--list`` (`listing`),
AUTO resolution and the checks (`checks`), what a resumed run may change (`changes`), what a job takes from a
pretrained model (igpt_jax/pretrained/sources.py) and which VQ-VAE settings a checkpoint fixes
(igpt_jax/pretrained/vqvae.py).

A field's role says what those rules do with it:

  architecture  defines the trained function: a job that reads a pretrained model takes it from the source; a
                resumed run cannot change it.
  tokens        the tokens a model was trained on (image side, channels, palette size): from the source for a job
                that reads a pretrained model; a resumed run cannot change them.
  data          which images a run trains on and how they become tokens: a resumed run cannot change them; a job
                that reads a pretrained model sets its own.
  schedule      optimizer, schedule and training randomness: a resumed run changes them only with
                ``checkpoint.allow_changes=True`` (each change is recorded).
  runtime       how and where the work runs (kernels, memory, devices, files, workers): free; a job that reads a
                pretrained model runs it with its own.
  job           what a job does besides training the model (its own settings, logging, evaluation, checkpoints):
                free.

The roles of a section speak of one training run (`Section.run`): the transformer's (``model``, ``data``,
``train``; every job but vqvae trains or reads it), the fine-tuned classifier's (``finetune``) or the VQ-VAE's
(``vqvae``). On resume, the fields of another run's sections are free: the VQ-VAE job may change ``train.lr``.

Two sections belong to the code that reads them: `ModelConfig` (igpt_jax/models/igpt.py) declares the model's fields,
their defaults and meanings (its docstring's "Attributes:"), and `default_data_config` (igpt_jax/data/config.py) the
data's (the comment at each field). Here they get their roles (`MODEL_ROLES`, `DATA_ROLES`) and their AUTO values.
Every other section is declared here, field by field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from igpt_jax import sharding
from igpt_jax.data import config as data_config
from igpt_jax.models.igpt import ModelConfig

# ------------------------------------------------------------------------------------------------ roles and runs
ARCHITECTURE, TOKENS, DATA, SCHEDULE, RUNTIME, JOB = "architecture", "tokens", "data", "schedule", "runtime", "job"
ROLES: dict[str, str] = {
    ARCHITECTURE: "defines the trained function: from a pretrained source; fixed on resume",
    TOKENS: "the tokens a model was trained on: from a pretrained source; fixed on resume",
    DATA: "the images trained on and how they become tokens: fixed on resume",
    SCHEDULE: "optimizer and schedule: changing it on resume needs checkpoint.allow_changes",
    RUNTIME: "how and where the work runs: free",
    JOB: "what a job does besides training the model: free",
}

# The training runs whose rules a section's roles speak of.
EVERY_RUN, IGPT, FINETUNE, VQVAE = "every", "igpt", "finetune", "vqvae"


def runs_of(job: str) -> frozenset[str]:
    """The runs whose sections' roles hold for a run of `job`: the VQ-VAE job trains the VQ-VAE alone; every other
    job trains or reads the transformer, and fine-tuning its classifier besides."""
    if job == "vqvae":
        return frozenset({EVERY_RUN, VQVAE})
    return frozenset({EVERY_RUN, IGPT, FINETUNE} if job == "finetune" else {EVERY_RUN, IGPT})


# ------------------------------------------------------------------------------------------------ the declaration
# A model or data field at AUTO follows the data when the config is resolved (`igpt_jax.config.checks.resolve`); a
# job that reads a pretrained model takes it from the source. The data's AUTO values are data.config.AUTO.
AUTO = 0


@dataclasses.dataclass(frozen=True)
class Auto:
    """A field's value that means "follows the data", and what the field then becomes."""

    value: Any
    follows: str = ""  # what it becomes, in words for --list ("" where the field's meaning says it)
    # the resolved config -> the field's value; None: the data's (igpt_jax.data.config.derive_data_settings)
    derive: Callable[[ml_collections.ConfigDict], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config field: its dotted path ('train.lr'; its bare name inside a `Section`), default, role, meaning."""

    path: str
    default: Any
    role: str | None  # one of ROLES; None only for a field someone forgot to declare (tests/test_settings.py fails)
    meaning: str
    auto: Auto | None = None
    run: str = EVERY_RUN  # the training run its role speaks of (its section's)


@dataclasses.dataclass(frozen=True)
class Section:
    """A group of fields declared here, one `Setting` each."""

    path: str  # '' for the top level
    run: str
    meaning: str
    fields: tuple[Setting, ...]

    def settings(self) -> list[Setting]:
        prefix = f"{self.path}." if self.path else ""
        return [dataclasses.replace(s, path=prefix + s.path, run=self.run) for s in self.fields]


@dataclasses.dataclass(frozen=True)
class OwnedSection:
    """A group of fields that the code reading them declares (defaults and meanings); here: their roles."""

    path: str
    run: str
    meaning: str
    build: Callable[[], ml_collections.ConfigDict]  # the section's defaults in the base config
    meanings: Callable[[], dict[str, str]]  # {field: meaning}, read from the owner
    roles: Mapping[str, str]
    autos: Mapping[str, Auto]

    def settings(self) -> list[Setting]:
        """The section's fields: those with a role in the order of `roles`, then any other (without a role)."""
        defaults, meanings = self.build(), self.meanings()
        order = [name for name in self.roles if name in defaults] + sorted(set(defaults) - set(self.roles))
        return [Setting(f"{self.path}.{name}", defaults[name], self.roles.get(name), meanings.get(name, ""),
                        self.autos.get(name), self.run) for name in order]


# The model: `ModelConfig`'s fields. An architecture field comes from a pretrained source and is fixed on resume;
# every other model field is the job's (igpt_jax/pretrained/sources.py: RUNTIME_FIELDS).
MODEL_ROLES: dict[str, str] = {
    "vocab_size": ARCHITECTURE, "n_ctx": ARCHITECTURE, "d_model": ARCHITECTURE, "n_head": ARCHITECTURE,
    "n_layer": ARCHITECTURE, "mlp_ratio": ARCHITECTURE, "objective": ARCHITECTURE, "bert_mask_rate": ARCHITECTURE,
    "norm_eps": ARCHITECTURE, "param_dtype": ARCHITECTURE, "mask": ARCHITECTURE,
    "attention": RUNTIME, "attention_block": RUNTIME, "splash_block_q": RUNTIME, "splash_block_kv": RUNTIME,
    "remat": RUNTIME, "scan_unroll": RUNTIME,
    "dtype": SCHEDULE, "dropout": SCHEDULE, "prefix_min": SCHEDULE, "prefix_max": SCHEDULE,
}
MODEL_AUTOS: dict[str, Auto] = {
    "vocab_size": Auto(AUTO, "data.n_colors", lambda config: int(config.data.n_colors)),
    "n_ctx": Auto(AUTO, "data.resolution**2", lambda config: int(config.data.resolution) ** 2),
}

# The data: `default_data_config`'s fields (also the VQ-VAE's images, vqvae.data).
DATA_ROLES: dict[str, str] = {
    "resolution": TOKENS, "channels": TOKENS, "n_colors": TOKENS,
    "name": DATA, "palette_seed": DATA, "palette_sample_pixels": DATA, "augment": DATA,
    "imagenet_resize_range": DATA, "imagenet_crop": DATA, "cifar_pad": DATA, "val_fraction": DATA, "fold_val": DATA,
    "train_split": DATA, "test_split": DATA, "allow_unlabeled": DATA, "shuffle_seed": DATA, "tokens": DATA,
    "data_dir": RUNTIME, "palette_path": RUNTIME, "auto_import": RUNTIME, "import_source": RUNTIME,
    "num_workers": RUNTIME, "read_threads": RUNTIME, "prefetch_buffer_size": RUNTIME,
}
DATA_AUTOS: dict[str, Auto] = {name: Auto(value) for name, value in data_config.AUTO.items()}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """`ModelConfig`'s fields and defaults as a ConfigDict; vocab_size and n_ctx default to AUTO (`MODEL_AUTOS`).

    AUTO fields follow the data when the config is resolved (`igpt_jax.config.checks.resolve`): vocab_size is
    data.n_colors, n_ctx is data.resolution**2.
    """
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields.update({name: auto.value for name, auto in MODEL_AUTOS.items()})
    fields.update(overrides)
    ModelConfig(**{**fields, **{k: 1 for k, a in MODEL_AUTOS.items() if fields[k] == a.value}})  # check what is set
    return ml_collections.ConfigDict(fields)


SECTIONS: tuple[Section | OwnedSection, ...] = (
    Section("", EVERY_RUN, "The run.", (
        Setting("job", "pretrain", JOB,
                "pretrain | probe | finetune | sample | evaluate | compile | vqvae | tokenize | lr_search"),
        Setting("seed", 0, SCHEDULE, "initialisation, training data order and augmentation, dropout and BERT masks"),
        Setting("then", (), JOB,
                "Jobs to run after `job` in the same command, each reading this run's checkpoint and writing to "
                "WORKDIR/<job> (the demo: pretrain, then probe and sample)."),
    )),
    OwnedSection(
        "model", IGPT, "The model (fields and meanings: igpt_jax/models/igpt.py ModelConfig). vocab_size 0: "
        "data.n_colors; n_ctx 0: data.resolution**2.",
        build=lambda: model_config(d_model=64, n_head=4, n_layer=2, remat="none"),
        meanings=lambda: docstring_attributes(ModelConfig), roles=MODEL_ROLES, autos=MODEL_AUTOS),
    OwnedSection(
        "data", IGPT, "The data (igpt_jax/data/config.py); resolution, channels, n_colors, augment and val_fraction "
        "at 0 / 'auto' / -1 follow data.name and the stored data.",
        build=lambda: data_config.default_data_config("digits", auto=True),
        meanings=lambda: source_comments(data_config.default_data_config, "cfg"), roles=DATA_ROLES,
        autos=DATA_AUTOS),
    Section("train", IGPT, "Pretraining (jobs pretrain and lr_search; compile compiles its step).", (
        Setting("batch_size", 128, SCHEDULE, "global, over all processes and devices"),
        Setting("num_steps", 1000, SCHEDULE, "optimizer steps in all (a resumed run continues to this many)"),
        Setting("lr", 3e-3, SCHEDULE, "peak learning rate (Adam)"),
        Setting("warmup_steps", -1, SCHEDULE, "-1: one epoch of the training split (paper; a tenth of the "
                "run, with a warning, when the epoch is at least the run); a count must be below num_steps"),
        Setting("schedule", "cosine", SCHEDULE, "cosine (to 0) | constant (after warmup)"),
        Setting("b1", 0.9, SCHEDULE, "Adam beta1"),
        Setting("b2", 0.95, SCHEDULE, "Adam beta2"),
        Setting("eps", 1e-8, SCHEDULE, "Adam epsilon"),
        Setting("weight_decay", 0.0, SCHEDULE, ">0: AdamW decoupled weight decay"),
        Setting("grad_clip_norm", 0.0, SCHEDULE, "0: no clipping"),
        Setting("grad_accum_steps", 1, RUNTIME, "micro-batches per step; exactly the same update as the full batch"),
        Setting("log_every", 10, JOB, "training metrics every this many steps"),
        Setting("eval_every", 100, JOB, "validation loss every this many steps (0: never)"),
        Setting("eval_batches", 0, JOB, "0: the whole validation split, exactly; >0: that many batches"),
        Setting("eval_batch_size", 0, JOB, "0: the training batch size"),
    )),
    Section("mesh", EVERY_RUN, "The devices' mesh and how arrays are split over it (igpt_jax/sharding.py).", (
        Setting("shape", (-1, 1, 1), RUNTIME,
                "(data, fsdp, context, tensor), or (data, fsdp, tensor) with context 1; one -1 fills the remaining "
                "devices. 'context' splits each sequence (sequence parallelism, igpt_jax/sharding.py)."),
        Setting("rules", sharding.DEFAULT_RULES, RUNTIME,
                "(logical axis name, mesh axes) pairs; see igpt_jax/sharding.py"),
    )),
    Section("checkpoint", EVERY_RUN, "Checkpoints: how a training run saves them, which one a job reads.", (
        Setting("every_steps", 200, JOB, "save every this many steps (and at the end, and on SIGTERM)"),
        Setting("max_to_keep", 3, JOB, "newest checkpoints kept"),
        Setting("async_save", True, RUNTIME, "write checkpoints in the background while training goes on"),
        Setting("allow_changes", False, JOB,
                "resuming with changed schedule settings (train.lr, train.schedule, ...; --list's role 'schedule'); "
                "see igpt_jax/config/changes.py"),
        Setting("take_over", False, JOB,
                "take the workdir's lease from a run that still holds it (that run stops at its next heartbeat); "
                "a stale lease is taken over without it (igpt_jax/training/lease.py)"),
        Setting("step", -1, JOB, "jobs that read a checkpoint: -1 = latest"),
        Setting("source_workdir", "", JOB, "probe/finetune/sample/evaluate: a pretraining run or a converted model"),
    )),
    Section("compile", EVERY_RUN, "Job 'compile': compile the train step ahead of time for a described TPU slice "
                                  "(needs `pip install libtpu`).", (
        Setting("topology", "", JOB, "e.g. 'v4:8x8x8' (v4-1024), 'v4:8x8x16', 'v3:32x32' (v3-2048), 'v5p:8x8x16'"),
        Setting("chip_config", "auto", JOB, "auto: 'megacore' on v4/v5p (one JAX device per chip), else 'default'"),
        Setting("chips_per_host_bounds", (), JOB, "e.g. (2, 2, 1); () = libtpu's default for the generation"),
        Setting("num_slices", 1, JOB, "slices joined over DCN (multislice)"),
        Setting("hbm_gib", 0.0, JOB,
                "HBM per JAX device; 0 = from the generation (v3 16 per core, v4 32, v5p 95 per chip)"),
        Setting("headroom", 0.9, JOB, "fits when the step's peak memory is at most this fraction of the device's HBM"),
        Setting("steps_per_epoch", 1, JOB, "no data is read: train.warmup_steps=-1 (one epoch) compiles as this many"),
    )),
    Section("sample", EVERY_RUN, "Job 'sample': images from a checkpoint with a key/value cache "
                                 "(igpt_jax/jobs/sample.py).", (
        Setting("mode", "complete", JOB,
                "complete: finish images of a split from their top rows | unconditional: from SOS"),
        Setting("num_samples", 16, JOB, "unconditional: how many images"),
        Setting("split", "test", JOB, "complete: the split whose first images are completed"),
        Setting("num_images", 8, JOB, "complete: how many images of the split"),
        Setting("given_rows", -1, JOB, "complete: rows given to the model; -1 = the top half"),
        Setting("samples_per_image", 4, JOB, "complete: completions per image"),
        Setting("temperature", 1.0, JOB, "0 = greedy (argmax)"),
        Setting("top_k", 0, JOB, "keep the k most likely colours at each step; 0 = off"),
        Setting("seed", 0, JOB, "sampling randomness"),
        Setting("batch_size", 32, RUNTIME, "sequences decoded at once (global); rounded to the data-parallel size"),
    )),
    Section("evaluate", EVERY_RUN, "Job 'evaluate': exact held-out NLL in nats and bits per token over a whole "
                                   "split (igpt_jax/jobs/evaluate.py).", (
        Setting("split", "test", JOB, "train | validation | test"),
        Setting("batch_size", 128, RUNTIME, "global; the last batch is padded and masked, so the mean is exact"),
    )),
    Section("lr_search", EVERY_RUN, "Job 'lr_search' (paper 3.4): short pretraining runs down a ladder of learning "
                                    "rates, largest first, stopping at the first local minimum of the final "
                                    "validation loss; each trial in WORKDIR/lr_<lr> (igpt_jax/jobs/lr_search.py).", (
        Setting("lrs", (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5), JOB,
                "peak learning rates, strictly descending (paper)"),
        Setting("schedule_fraction", 0.1, JOB,
                "trial length: this fraction of train.num_steps (warmup, checkpoints too)"),
    )),
    Section("probe", EVERY_RUN, "Linear probes (job 'probe', paper 2.4, 4.1-4.4, 4.7): features of every layer, "
                                "one logistic regression each.", (
        Setting("layers", "all", JOB,
                "'all' (0..n_layer; n_layer = the final norm) or comma-separated ids, e.g. '4,8,-1'"),
        Setting("batch_size", 0, RUNTIME,
                "global feature-extraction batch; 0: train.eval_batch_size, else train.batch_size"),
        Setting("head", "linear", JOB,
                "'linear': logistic regressions on pooled features (the paper's); 'attentive': also AIM's attentive "
                "probe on the same pass's token features (one learned query per head over every token, AdamW; "
                "igpt_jax/probing/attentive.py), stored in bfloat16 in WORKDIR/tokens"),
        Setting("average_layers", False, JOB,
                "attentive head: one probe on the mean of probe.layers' token features (AIM's) instead of one per "
                "layer"),
        Setting("attentive_heads", 4, JOB, "attentive head: attention heads of the pooling query"),
        Setting("attentive_lrs", (1e-2, 3e-3, 1e-3), JOB,
                "attentive head: AdamW peak learning rates searched on validation"),
        Setting("attentive_weight_decays", (0.0, 0.05), JOB,
                "attentive head: AdamW decoupled weight decays searched on validation (every pair with the lrs)"),
        Setting("attentive_epochs", 10, JOB,
                "attentive head: epochs (cosine decay to 0); the best epoch on validation is kept (early stopping)"),
        Setting("attentive_batch_size", 256, JOB, "attentive head: examples per AdamW step"),
        Setting("pooling", "mean", JOB,
                "'mean': each layer's feature is its sequence mean (the paper's); 'quadrants': the means of the token "
                "grid's four quadrants, concatenated (4 x width features; keeps the coarse layout that a linear model "
                "on raw pixels sees)"),
        Setting("solver", "auto", JOB,
                "auto: jax_lbfgs where it is faster (layers x examples x features of at least "
                "igpt_jax.probing.linear_probe.AUTO_JAX_FROM), else lbfgs; "
                "jax_lbfgs: scikit-learn's objective, full-batch L-BFGS in JAX, all layers in one compiled call "
                "(CIFAR/STL in the paper); lbfgs: scikit-learn itself (the reference, slower); sgd: JAX SGD (large "
                "datasets, ImageNet)"),
        Setting("C", (1e-3, 1e-2, 1e-1, 1.0, 10.0), JOB,
                "jax_lbfgs/lbfgs: inverse L2 strengths searched on validation"),
        Setting("C_widen", 4, JOB,
                "more C values per side while a feature set's best C is at the grid's edge (0: fixed grid)"),
        Setting("C_bounds", (1e-6, 1e4), JOB, "the widened grid stays inside these"),
        Setting("max_iter", 1000, JOB, "jax_lbfgs/lbfgs iterations"),
        Setting("standardize", True, JOB, "features standardised with the training split's mean and std"),
        Setting("sgd_lrs", (30.0, 10.0, 3.0, 1.0), JOB,
                "sgd: learning rates searched on validation (paper: 30, 10, 3, ...)"),
        Setting("sgd_steps", 1000, JOB, "sgd: steps, cosine decay to 0"),
        Setting("sgd_batch_size", 256, JOB, "sgd: batch of features per step"),
        Setting("sgd_momentum", 0.9, JOB, "sgd: momentum"),
        Setting("sgd_weight_decay", 0.0, JOB, "sgd: L2 penalty"),
        Setting("concat_layers", 0, JOB,
                ">1: also probe this many layers centred on the best one, concatenated (paper: 11)"),
        Setting("baselines", True, JOB, "also probe raw pixels and the same architecture with random weights"),
        Setting("max_train_examples", 0, JOB, "0: the whole training split"),
        Setting("low_data_budgets", (), JOB, "label budgets, e.g. (40, 250, 4000) on CIFAR-10 (paper 4.7)"),
        Setting("low_data_subsets", 5, JOB, "random class-balanced subsets per budget"),
        Setting("bert_ensemble", 5, JOB, "BERT models: masks per validation/test example, modal prediction (1: off)"),
        Setting("checkpoint_steps", (), JOB,
                "(): just checkpoint.step; several steps also plot accuracy vs validation loss"),
        Setting("seed", 0, JOB, "BERT masks, random-init baseline, tie breaking, low-data subsets"),
        Setting("resume", True, JOB,
                "save features per split and fitted probes in WORKDIR/progress; a rerun reuses them"),
        Setting("plots", True, JOB, "probe_layers.png (and probe_vs_val_loss.png for several checkpoints)"),
    )),
    Section("track", EVERY_RUN, "Representation tracking while pretraining (igpt_jax/probing/tracking.py): every "
                                "`every` steps, a probe of every layer (JAX L-BFGS) on a fixed labelled subset; "
                                "accuracies to TensorBoard, metrics.jsonl and tracking.png.", (
        Setting("every", 0, JOB, "steps between evaluations (and at the last step); 0: off"),
        Setting("train_examples", 2000, JOB, "the probe is fitted on the first this many images of the training split"),
        Setting("val_examples", 1000, JOB, "C chosen and accuracy measured on the first this many validation images"),
        Setting("C", (), JOB,
                "inverse L2 strengths; (): probe.C (widened at its edges by probe.C_widen, as the probe's)"),
        Setting("attentive", False, JOB,
                "also fit the attentive head (probe.attentive_* settings) on the subset's tokens averaged over every "
                "layer: track/attentive_accuracy (costs a head's training per evaluation)"),
    )),
    Section("finetune", FINETUNE, "Fine-tuning (job 'finetune', paper 2.3, 3.4, 4.5): a zero-initialised head on a "
                                  "sequence-mean feature.", (
        Setting("init", "pretrained", ARCHITECTURE,
                "pretrained (from checkpoint.source_workdir) | random (from-scratch baseline)"),
        Setting("objective", "gen+clf", ARCHITECTURE, "gen+clf: L_GEN + L_CLF (paper) | clf: L_CLF only"),
        Setting("head_layer", -1, ARCHITECTURE,
                "-1: mean of the final norm's output (paper); l: mean of block l's ln_1 output"),
        Setting("lr", 3e-4, SCHEDULE,
                "Adam (b1, b2, eps, clipping from config.train), constant after warmup (no cosine)"),
        Setting("warmup_steps", 0, SCHEDULE, "linear warmup steps (below finetune.num_steps)"),
        Setting("num_steps", 1000, SCHEDULE, "fine-tuning steps"),
        Setting("batch_size", 0, SCHEDULE, "global; 0: train.batch_size"),
        Setting("eval_every", 100, JOB, "validation accuracy every this many steps (and at step 0); keeps the best"),
        Setting("eval_batch_size", 0, JOB, "global; 0: the fine-tuning batch size"),
        Setting("patience", 0, JOB,
                "early stop after this many evaluations without a better validation accuracy; 0: never"),
        Setting("dropout", 0.0, SCHEDULE, "residual/embedding dropout while fine-tuning (paper: none)"),
        Setting("num_classes", 0, ARCHITECTURE, "0: the dataset's; otherwise it must equal the dataset's"),
        Setting("bert_ensemble", 5, JOB, "BERT models: masks per evaluation example, modal prediction (1: off)"),
        Setting("log_every", 10, JOB, "training metrics every this many steps"),
    )),
    OwnedSection(
        "vqvae.data", VQVAE, "the images it encodes (read as raw pixels in [-1, 1])",
        build=data_config.default_data_config,
        meanings=lambda: source_comments(data_config.default_data_config, "cfg"), roles=DATA_ROLES,
        autos=DATA_AUTOS),
    Section("vqvae", VQVAE, "The VQ-VAE of paper A.2 (job 'vqvae', igpt_jax/jobs/vqvae.py) and the codes it writes "
                            "(job 'tokenize').", (
        Setting("vocab_size", 512, ARCHITECTURE, "codebook size (paper: 4,096)"),
        Setting("downsample", 1, ARCHITECTURE, "encoder blocks: 1 = 2x (32 -> 16, 96 -> 48), 2 = 4x (192 -> 48)"),
        Setting("residual_layers", 1, ARCHITECTURE, "residual layers per block (32 hidden units each)"),
        Setting("decay", 0.99, SCHEDULE, "EMA decay of the codebook's cluster sizes and sums"),
        Setting("epsilon", 1e-5, SCHEDULE, "Laplace smoothing of the cluster sizes"),
        Setting("commitment", 0.02, SCHEDULE, "paper A.2"),
        Setting("dead_fraction", 0.1, SCHEDULE,
                "dead: EMA usage below this fraction of batch x grid / vocabulary (paper)"),
        Setting("revive_noise", 0.01, SCHEDULE,
                "revived code = a random encoder output of the batch + this x std x N(0, 1)"),
        Setting("lr", 1e-4, SCHEDULE, "Adam (paper A.2)"),
        Setting("batch_size", 64, SCHEDULE, "global"),
        Setting("num_steps", 1000, SCHEDULE, "training steps"),
        Setting("log_every", 50, JOB, "training metrics every this many steps"),
        Setting("data_variance", 0.0, SCHEDULE, "the reconstruction loss's divisor; 0: estimated from training images"),
        Setting("variance_images", 1000, JOB, "images the estimate uses"),
        Setting("eval_batch_size", 256, JOB, "test-split reconstruction error"),
        Setting("grid_images", 8, JOB, "test images in reconstructions.png (0: none)"),
    )),
    Section("tokenize", VQVAE, "Job 'tokenize': every split encoded with a trained VQ-VAE.", (
        Setting("batch_size", 256, RUNTIME, "images encoded at once"),
    )),
)


# ------------------------------------------------------------------------------------------------ owners' meanings
def source_comments(function: Any, root: str, prefix: str = "") -> dict[str, str]:
    """{dotted field: comment} for the assignments ``root.a.b = ...`` in `function`'s source.

    A field's comment is the ``# ...`` at the end of its assignment, or the ``# ...`` lines right above it.

    Args:
      function: a function whose body builds a ConfigDict in a local variable named `root`.
      root: that variable's name ('c', 'cfg').
      prefix: prepended to every field path (e.g. 'data.').
    """
    source = textwrap.dedent(inspect.getsource(function))
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = lines[token.start[0] - 1]
            if line[: token.start[1]].strip():
                trailing[token.start[0]] = token.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        path = _attribute_path(node.targets[0], root)
        if path is None:
            continue
        comment = trailing.get(node.lineno) or trailing.get(node.end_lineno)
        if not comment:
            above = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            comment = " ".join(above)
        if comment:
            out[prefix + path] = comment
    return out


def _attribute_path(target: ast.expr, root: str) -> str | None:
    parts = []
    while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == root and parts:
        return ".".join(parts)
    return None


def docstring_attributes(cls: type, prefix: str = "") -> dict[str, str]:
    """{prefix + name: description} from the "Attributes:" section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    out: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^\s{2}(\w+): (.*)$", line)
        if match:
            name = match[1]
            out[prefix + name] = match[2].strip()
        elif name and line.startswith("    ") and line.strip():
            out[prefix + name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


# ------------------------------------------------------------------------------------------------ reading it
def build_config() -> ml_collections.ConfigDict:
    """A new ConfigDict of every declared field at its default, in declaration order (`base_config`)."""
    config = ml_collections.ConfigDict()
    for section in SECTIONS:
        node = config
        for part in filter(None, section.path.split(".")[:-1]):
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        name = section.path.split(".")[-1]
        if isinstance(section, OwnedSection):
            node[name] = section.build()
            continue
        if name:
            if name not in node:  # (present already when a sub-section was declared first: vqvae.data, vqvae)
                node[name] = ml_collections.ConfigDict()
            node = node[name]
        for setting in section.fields:
            node[setting.path] = setting.default
    return config


def declare(sections: tuple[Section | OwnedSection, ...]) -> dict[str, Setting]:
    """{dotted path: Setting} of every field of `sections` (`SETTINGS` is `SECTIONS`')."""
    settings: dict[str, Setting] = {}
    for section in sections:
        for setting in section.settings():
            if setting.path in settings:
                raise ValueError(f"config field {setting.path} is declared twice in igpt_jax/config/settings.py")
            settings[setting.path] = setting
    return settings


SETTINGS: dict[str, Setting] = declare(SECTIONS)


def get(path: str) -> Setting | None:
    """The declaration of the field at `path` ('train.lr'); None for a field that is not declared."""
    return SETTINGS.get(path)


def names(section: str, *roles: str) -> tuple[str, ...]:
    """The names of the fields directly in `section` ('' for the top level) with one of `roles`, in order."""
    prefix = f"{section}." if section else ""
    return tuple(s.path[len(prefix):] for s in SETTINGS.values()
                 if s.path.startswith(prefix) and "." not in s.path[len(prefix):] and s.role in roles)


def autos(section: str) -> dict[str, Auto]:
    """{name: Auto} of the fields directly in `section` that may be left to follow the data."""
    prefix = f"{section}."
    return {s.path[len(prefix):]: s.auto for s in SETTINGS.values()
            if s.auto is not None and s.path.startswith(prefix) and "." not in s.path[len(prefix):]}


def is_auto(path: str, value: Any) -> bool:
    """Whether `value` of the field at `path` is its AUTO value (it follows the data or the source)."""
    setting = SETTINGS.get(path)
    return (setting is not None and setting.auto is not None and not isinstance(value, bool)
            and value == setting.auto.value)


def meaning(path: str) -> str:
    """The field's meaning, with what its AUTO value follows (for --list); '' for a field that is not declared."""
    setting = SETTINGS.get(path)
    if setting is None:
        return ""
    if setting.auto is not None and setting.auto.follows:
        return f"{setting.meaning} ({setting.auto.value}: {setting.auto.follows})".strip()
    return setting.meaning


def section_meanings() -> dict[str, str]:
    """{section path: what it holds}."""
    return {section.path: section.meaning for section in SECTIONS if section.path}


def undeclared() -> list[str]:
    """One line per gap in the declaration: a field without a role, an unknown role, a role for no field."""
    problems = [f"{s.path} has no role" for s in SETTINGS.values() if s.role is None]
    problems += [f"{s.path} has the role {s.role!r}, not one of {', '.join(ROLES)}" for s in SETTINGS.values()
                 if s.role is not None and s.role not in ROLES]
    for section in SECTIONS:
        if isinstance(section, OwnedSection):
            fields = section.build()
            problems += [f"{section.path}.{name} has a role but is no field" for name in section.roles
                         if name not in fields]
            problems += [f"{section.path}.{name} has an AUTO value but is no field" for name in section.autos
                         if name not in fields]
    return problems
