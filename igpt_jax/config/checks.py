"""A whole config, resolved and checked before any job starts: one line per problem, naming the field.

`resolve` fills the settings that follow the data (fields left at AUTO: the data's resolution, channels, palette
size, augmentation and validation share from ``data.name`` and the stored data; the model's vocabulary and context
from the palette and resolution). `validate` then checks the jobs, batch sizes, mesh and every cross-field rule the
jobs rely on, so that a bad setting fails in a second, before a dataset is imported, a workdir written or a step
run. `follow_up_jobs` is the one place that says how `config.then` jobs are configured, so that main checks exactly
the configs it will run.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import ml_collections

from igpt_jax import sharding
from igpt_jax.config import settings
from igpt_jax.data import augment, auto_import, builders
from igpt_jax.data import config as data_config
from igpt_jax.errors import ConfigError
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.probing import attentive
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe

# config.job -> (module whose run(config, workdir) does it, one-line description for --list).
JOBS: dict[str, tuple[str, str]] = {
    "pretrain": ("igpt_jax.jobs.pretrain", "train iGPT on the data (resumes from the workdir's latest checkpoint)"),
    "probe": ("igpt_jax.jobs.probe", "linear probe of every layer's features of a pretraining checkpoint"),
    "finetune": ("igpt_jax.jobs.finetune", "fine-tune a pretraining checkpoint (or a random init) as a classifier"),
    "sample": ("igpt_jax.jobs.sample", "image completions or unconditional samples from a checkpoint"),
    "evaluate": ("igpt_jax.jobs.evaluate", "exact held-out NLL (nats and bits per token) of a checkpoint on a split"),
    "compile": ("igpt_jax.jobs.compile", "compile the train step for a described TPU slice: does it fit? (libtpu)"),
    "vqvae": ("igpt_jax.jobs.vqvae", "train the VQ-VAE of paper A.2 on raw pixels (resumes like pretraining)"),
    "tokenize": ("igpt_jax.jobs.tokenize", "encode every split with a trained VQ-VAE into a TFDS dataset of codes"),
    "lr_search": ("igpt_jax.jobs.lr_search", "short pretraining runs down lr_search.lrs to the first local minimum "
                                             "of validation loss (paper 3.4)"),
}
# Jobs that read a pretrained model (checkpoint.source_workdir: a pretraining run or a converted model).
CHECKPOINT_JOBS = ("probe", "finetune", "sample", "evaluate")
# Jobs whose workdir the jobs after them in `config.then` read: the VQ-VAE for tokenize, the model for the rest.
SOURCE_JOBS = ("pretrain", "vqvae")
# Data settings that a pretrained model's source decides for the jobs that read it (the role 'tokens').
SOURCE_DATA_FIELDS = settings.names("data", settings.TOKENS)
# Jobs `config.then` may hold.
FOLLOW_UP_JOBS = CHECKPOINT_JOBS + ("tokenize", "pretrain")
PROBE_HEADS = ("linear", "attentive")


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------ derived settings
def resolve(config: ml_collections.ConfigDict, *, read_data: bool = True) -> ml_collections.ConfigDict:
    """Fills, in place, the fields left at AUTO; explicit values are kept (`validate` reports contradictions).

    Args:
      config: a full config (locked or not).
      read_data: look at the stored data (data_dir, the import source) for the image shape of a dataset that is not
        in the catalog; False: use the defaults of an unknown dataset.

    Returns:
      `config`, for chaining.
    """
    data, model = config.data, config.model
    # A job that reads a pretrained model takes the source's tokens (palette size, resolution, channels, vocabulary,
    # context; igpt_jax/pretrained/sources.py): what is left AUTO here stays AUTO for the source to fill.
    from_source = _reads_pretrained(config)
    with config.unlocked():
        vocabulary_set = not settings.is_auto("model.vocab_size", model.vocab_size)
        if settings.is_auto("data.n_colors", data.n_colors) and vocabulary_set:
            data.n_colors = model.vocab_size  # the palette follows an explicit vocabulary
        if any(settings.is_auto(f"data.{name}", value) for name, value in data.items()):
            shape = _stored_shape(data) if read_data and not from_source else None
            for key, value in data_config.derive_data_settings(data, shape).items():
                if not (from_source and key in SOURCE_DATA_FIELDS):
                    data[key] = value
        if from_source:
            return config
        for name, auto in settings.autos("model").items():
            if settings.is_auto(f"model.{name}", model[name]):
                model[name] = auto.derive(config)
    return config


def _reads_pretrained(config: ml_collections.ConfigDict) -> bool:
    return config.job in CHECKPOINT_JOBS and not (config.job == "finetune" and config.finetune.init == "random")


def _stored_shape(data: ml_collections.ConfigDict):
    return data_config.stored_image_shape(data.name, data_config.resolve_data_dir(data.data_dir), _auto_source(data))


def check_data_available(config: ml_collections.ConfigDict) -> None:
    """The dataset of a job that reads data is in data_dir or can be imported (digits; a found .npz or folder).

    Raises:
      ConfigError: a bad dataset name, or a dataset that is missing with nothing to import it from.
    """
    if config.job == "compile" or (config.job == "sample" and config.sample.mode == "unconditional"):
        return
    data = config.vqvae.data if config.job in ("vqvae", "tokenize") else config.data  # tokenize writes config.data
    try:
        builders.check_name(data.name)
    except ValueError as err:
        raise ConfigError(f"data.name={data.name!r}: {err}") from None
    data_dir = data_config.resolve_data_dir(data.data_dir)
    if auto_import.prepared_versions(data.name, data_dir):
        return
    if not data.get("auto_import", False):
        raise ConfigError(f"data.name={data.name!r} is not in {data_dir} (data.auto_import is off); import it with "
                          f"python -m igpt_jax.data.import_data --name={data.name} --data_dir={data_dir} --source=...")
    if data.name != "digits" and _auto_source(data) is None:
        raise ConfigError(f"data.name={data.name!r} is not in {data_dir} and there is nothing to import it from; "
                          f"import it with python -m igpt_jax.data.import_data --name={data.name} "
                          f"--data_dir={data_dir} --source=<.npz or image folder>, or set data.import_source")


def _auto_source(data: ml_collections.ConfigDict) -> str | None:
    return auto_import.auto_import_source(data) if data.get("auto_import", False) else None


# ------------------------------------------------------------------------------------------------ follow-up jobs
def follow_up_jobs(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
    """(config, workdir) of each job that runs after `config.job` in this command, each writing to WORKDIR/<job>.

    `config.then` is the pipeline after the config's own job (the demo: pretrain, then probe and sample; the VQ-VAE
    config: vqvae, then tokenize, pretrain and probe). It runs after a job that trains a source (pretrain, vqvae),
    after a job that reads an explicit `checkpoint.source_workdir` (a probe of a converted model, then its
    fine-tuning), and, when `config.job` is itself one of its stages (``--config.job=probe`` on the demo), from the
    stage after it. Otherwise (e.g. ``--config.job=evaluate`` on the demo, or the compile job) it does not apply.
    Each follow-up reads the newest run this command trained, at its latest step; with none trained yet, the same
    source as `config.job`.
    """
    then = list(config.then)
    if config.job == "compile":
        return []
    if config.job in then:
        then = then[then.index(config.job) + 1:]
    elif config.job not in SOURCE_JOBS and not config.checkpoint.source_workdir:
        return []
    source = workdir if config.job in SOURCE_JOBS else None
    out = []
    for follow_up in then:
        follow_config = config.copy_and_resolve_references()
        with follow_config.unlocked():
            follow_config.job = follow_up
            follow_config.then = ()
            if source is not None:
                follow_config.checkpoint.source_workdir = source
                follow_config.checkpoint.step = -1
        follow_workdir = f"{workdir.rstrip('/')}/{follow_up}"
        out.append((follow_config, follow_workdir))
        if follow_up in SOURCE_JOBS:
            source = follow_workdir
    return out


# ------------------------------------------------------------------------------------------------ checks
def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Checks everything the job named by `config.job` relies on, without reading data or touching devices.

    Args:
      config: a resolved config (see `resolve`).
      num_devices: the devices the mesh must cover; None (the compile job, or before JAX starts): a -1 mesh axis is
        left unchecked.

    Raises:
      ConfigError: the first problem, in one line.
    """
    _check_jobs(config)
    job = config.job
    _check_data(config.data, from_source=_reads_pretrained(config))
    reads_model_from_config = job in ("pretrain", "compile", "lr_search") or (
        job == "finetune" and config.finetune.init == "random")
    if reads_model_from_config:
        _check_model(config)
    mesh_sizes = _mesh_sizes(config.mesh, num_devices)
    dp = _batch_split(mesh_sizes, config.mesh.rules)
    if reads_model_from_config:
        _check_model_fits_mesh(config, mesh_sizes)
    if job in ("pretrain", "compile", "lr_search"):
        _check_training(config, dp)
    if job == "pretrain":
        _check_tracking(config, dp)
        _check_probe_steps_kept(config)
    elif job == "lr_search":
        _check_lr_search(config)
    elif job == "probe":
        _positive(config.probe, "probe",
                  ("max_iter", "sgd_steps", "sgd_batch_size", "low_data_subsets", "bert_ensemble"))
        _non_negative(config.probe, "probe", ("batch_size", "concat_layers", "max_train_examples"))
        batch = config.probe.batch_size or config.train.eval_batch_size or config.train.batch_size
        _check_batch("probe.batch_size", batch, dp)
        _check_probe(config)
    elif job == "finetune":
        _positive(config.finetune, "finetune", ("num_steps", "eval_every", "log_every", "bert_ensemble"))
        _non_negative(config.finetune, "finetune", ("batch_size", "eval_batch_size", "warmup_steps", "patience",
                                                    "num_classes"))
        _check_positive_number(config.finetune, "finetune", "lr")
        check_warmup("finetune", config.finetune.warmup_steps, config.finetune.num_steps)
        _one_of(config.finetune, "finetune", "objective", ("gen+clf", "clf"))
        _one_of(config.finetune, "finetune", "init", ("pretrained", "random"))
        batch = config.finetune.batch_size or config.train.batch_size
        _check_batch("finetune.batch_size", batch, dp)
        _check_batch("finetune.eval_batch_size", config.finetune.eval_batch_size or batch, dp)
    elif job == "sample":
        _positive(config.sample, "sample", ("num_samples", "num_images", "samples_per_image", "batch_size"))
        _one_of(config.sample, "sample", "mode", ("complete", "unconditional"))
        _one_of(config.sample, "sample", "split", ("train", "validation", "test"))
        rows, resolution = config.sample.given_rows, config.data.resolution or 10**9  # AUTO: the source's
        if not isinstance(rows, int) or rows < -1 or rows > resolution:
            raise ConfigError(f"sample.given_rows={rows!r} must be -1 (the top half) or a number of rows in "
                              f"[0, {resolution}] (data.resolution)")
    elif job == "evaluate":
        _one_of(config.evaluate, "evaluate", "split", ("train", "validation", "test"))
        _check_batch("evaluate.batch_size", config.evaluate.batch_size, dp)
    if job in CHECKPOINT_JOBS:
        _check_checkpoint_source(config)


def _check_jobs(config: ml_collections.ConfigDict) -> None:
    if config.job not in JOBS:
        raise ConfigError(f"config.job={config.job!r} is not a job{did_you_mean(config.job, JOBS)}; "
                          f"jobs: {', '.join(JOBS)}")
    then = config.then
    if isinstance(then, str) or not isinstance(then, (tuple, list)):
        raise ConfigError(f"config.then={then!r} must be a tuple of job names, e.g. --config.then=\"('probe',)\"")
    for i, follow_up in enumerate(then):
        if follow_up not in FOLLOW_UP_JOBS:
            what = "is not a follow-up job" if follow_up in JOBS else "is not a job"
            raise ConfigError(f"config.then[{i}]={follow_up!r} {what}{did_you_mean(follow_up, FOLLOW_UP_JOBS)}; "
                              f"follow-up jobs (they read the run before them): {', '.join(FOLLOW_UP_JOBS)}")


def _check_data(data: ml_collections.ConfigDict, *, from_source: bool = False) -> None:
    """`from_source`: the job reads a pretrained model, whose source fills the data fields left AUTO."""
    _one_of(data, "data", "augment", augment.STYLES)
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must lie in [0, 1)")
    if from_source and any(settings.is_auto(f"data.{k}", data[k]) for k in SOURCE_DATA_FIELDS):
        return
    if data.channels not in (1, 3):
        raise ConfigError(f"data.channels={data.channels!r} must be 1 (grayscale) or 3 (RGB)")
    _positive(data, "data", ("resolution",))
    top = 256 if data.channels == 1 else 2**24
    if data.get("tokens") == "codes":  # VQ-VAE codes: n_colors is the codebook size, not a palette
        top = 2**16
    if not isinstance(data.n_colors, int) or not 2 <= data.n_colors <= top:
        raise ConfigError(f"data.n_colors={data.n_colors!r} must be an integer in [2, {top}] for {data.channels} "
                          "channel(s)")


def _check_model(config: ml_collections.ConfigDict) -> None:
    try:
        model = ModelConfig.from_config(config.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_tokens_fit_model(model.vocab_size, model.n_ctx, n_colors=config.data.n_colors,
                           resolution=config.data.resolution)


def check_tokens_fit_model(vocab_size: int, n_ctx: int, *, n_colors: int, resolution: int) -> None:
    """The model's vocabulary is the palette, and an image's tokens fit in its context.

    Raises:
      ConfigError: naming both fields and how to make them agree.
    """
    if vocab_size != n_colors:
        raise ConfigError(f"model.vocab_size={vocab_size} differs from data.n_colors={n_colors}: the "
                          "model's vocabulary is the palette; set one of them (the other follows) or both equal")
    if resolution**2 > n_ctx:
        raise ConfigError(f"data.resolution={resolution} gives {resolution**2} tokens per image, more than "
                          f"model.n_ctx={n_ctx}; set model.n_ctx to 0 (it follows the resolution) or at least "
                          f"{resolution**2}")


def _mesh_sizes(mesh: ml_collections.ConfigDict, num_devices: int | None) -> dict[str, int | None]:
    """Mesh axis -> size (None: a -1 axis whose size is not known yet)."""
    try:
        sharding.rules_from_config(mesh.rules)
        shape = tuple(int(s) for s in mesh.shape)
        if num_devices is not None:
            return dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(shape, num_devices)))
        sharding.resolve_mesh_shape(shape, math.prod(abs(s) for s in shape))  # the checks that need no devices
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    return {axis: (None if s == -1 else s) for axis, s in zip(sharding.MESH_AXES, shape)}


def _split(mesh_sizes: dict[str, int | None], rules: Any, logical_name: str) -> tuple[int | None, tuple[str, ...]]:
    """How many ways (None: unknown) and over which mesh axes a logical dimension is split."""
    axes = sharding.mesh_axes_of(logical_name, sharding.rules_from_config(rules))
    sizes = [mesh_sizes.get(axis, 1) for axis in axes]
    return (None if None in sizes else math.prod(sizes)), axes


def _batch_split(mesh_sizes: dict[str, int | None], rules: Any) -> int | None:
    return _split(mesh_sizes, rules, "activation_batch")[0]


def _check_model_fits_mesh(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int | None]) -> None:
    """Every model dimension that the rules shard must divide by the mesh axes it is split over."""
    m = config.model
    dims = {
        ("vocab", "activation_vocab"): ("model.vocab_size", m.vocab_size),
        ("heads", "activation_heads"): ("model.n_head", m.n_head),
        ("embed", "activation_embed"): ("model.d_model", m.d_model),
        ("kv", "activation_kv"): ("the head size model.d_model/model.n_head", m.d_model // m.n_head),
        ("mlp", "activation_mlp"): ("the MLP width model.mlp_ratio*model.d_model", m.mlp_ratio * m.d_model),
        ("position",): ("model.n_ctx", m.n_ctx),
        ("activation_length",): ("the sequence length data.resolution**2", config.data.resolution**2),
        ("layers",): ("model.n_layer", m.n_layer),
    }
    for names, (what, size) in dims.items():
        for name in names:
            ways, axes = _split(mesh_sizes, config.mesh.rules, name)
            if ways and size % ways:
                shape = ", ".join(f"{a}={s}" for a, s in mesh_sizes.items())
                raise ConfigError(f"{what}={size} cannot be split {ways} ways over mesh axes {axes} (mesh.shape: "
                                  f"{shape}; rule {name!r}): choose a mesh whose {'x'.join(axes)} size divides {size}")


def _check_training(config: ml_collections.ConfigDict, dp: int | None) -> None:
    t = config.train
    _positive(t, "train", ("batch_size", "num_steps", "log_every", "grad_accum_steps"))
    _non_negative(t, "train", ("eval_every", "eval_batches", "eval_batch_size", "weight_decay", "grad_clip_norm"))
    _check_positive_number(t, "train", "lr")
    _one_of(t, "train", "schedule", ("cosine", "constant"))
    if t.warmup_steps < -1:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be -1 (one epoch) or a count >= 0")
    check_warmup("train", t.warmup_steps, t.num_steps)
    if not (0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0):
        raise ConfigError(f"train.b1={t.b1} and train.b2={t.b2} must lie in [0, 1)")
    _check_batch("train.batch_size", t.batch_size, dp)
    check_grad_accum(t.batch_size, t.grad_accum_steps, dp)
    if t.eval_every:
        _check_batch("train.eval_batch_size", t.eval_batch_size or t.batch_size, dp)
    c = config.checkpoint
    _positive(c, "checkpoint", ("every_steps", "max_to_keep"))


def check_warmup(section: str, warmup_steps: int, num_steps: int) -> None:
    """An explicit warmup (> 0) shorter than the run: one at least ``num_steps`` long would keep the learning rate
    below its peak to the end (and never start the cosine). Warmup -1 (one epoch) is shortened by the job instead,
    which knows the epoch (`igpt_jax.training.optim.warmup_steps_for`).

    Raises:
      ConfigError: naming both fields and numbers.
    """
    if warmup_steps > 0 and warmup_steps >= num_steps:
        raise ConfigError(f"{section}.warmup_steps={warmup_steps} is at least the whole run ({section}.num_steps="
                          f"{num_steps}): the learning rate would never reach its peak; choose fewer than {num_steps} "
                          f"warmup steps (e.g. {num_steps // 10})")


def check_grad_accum(batch_size: int, grad_accum_steps: int, dp: int | None) -> None:
    """Gradient accumulation splits the global batch into equal micro-batches, each divisible by the data-parallel
    size `dp` (None: not known yet).

    Raises:
      ConfigError: naming both fields (and the data-parallel size).
    """
    if grad_accum_steps < 1 or batch_size % grad_accum_steps or (dp and (batch_size // grad_accum_steps) % dp):
        raise ConfigError(f"train.grad_accum_steps={grad_accum_steps} must divide train.batch_size={batch_size} "
                          "into micro-batches" + (f" divisible by the data-parallel size {dp}" if dp else ""))


def _check_lr_search(config: ml_collections.ConfigDict) -> None:
    lrs, fraction = config.lr_search.lrs, config.lr_search.schedule_fraction
    if isinstance(lrs, str) or not isinstance(lrs, (tuple, list)) or not lrs:
        raise ConfigError(f"lr_search.lrs={lrs!r} must be a non-empty tuple of learning rates, largest first, e.g. "
                          "--config.lr_search.lrs=\"(0.01, 0.003, 0.001)\"")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf for x in lrs):
        raise ConfigError(f"lr_search.lrs={tuple(lrs)} must hold positive finite numbers")
    if any(a <= b for a, b in zip(lrs, lrs[1:])):
        raise ConfigError(f"lr_search.lrs={tuple(lrs)} must be strictly descending (the search goes from large to "
                          "small)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"lr_search.schedule_fraction={fraction!r} must lie in (0, 1]")
    if not config.train.eval_every:
        raise ConfigError("train.eval_every=0: the learning-rate search compares final validation losses; set it "
                          "> 0 (each trial evaluates at least at its last step)")


def _check_probe(config: ml_collections.ConfigDict) -> None:
    if config.data.fold_val:
        raise ConfigError("data.fold_val=True puts the validation split into 'train': the probe chooses C and the "
                          "layer on validation and folds it back itself; set data.fold_val=False")
    try:
        linear_probe.ProbeSettings.from_config(config.probe)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _no_repeats(config.probe, "probe", ("C", "sgd_lrs", "attentive_lrs", "attentive_weight_decays", "low_data_budgets",
                                        "checkpoint_steps"))
    if config.probe.head not in PROBE_HEADS:
        raise ConfigError(f"probe.head={config.probe.head!r}: expected one of {PROBE_HEADS}")
    try:
        attentive.AttentiveSettings.from_config(config.probe)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    pooling = config.probe.get("pooling", "mean")
    if pooling not in features_lib.POOLINGS:
        raise ConfigError(f"probe.pooling={pooling!r}: expected one of {sorted(features_lib.POOLINGS)}")
    layers = config.probe.layers
    if isinstance(layers, str) and layers.strip().lower() not in ("", "all"):
        if not all(part.strip().lstrip("-").isdigit() for part in layers.split(",") if part.strip()):
            raise ConfigError(f"probe.layers={layers!r}: expected 'all' or comma-separated layer ids, e.g. '4,8,-1'")
    budgets = config.probe.low_data_budgets
    if any(not isinstance(b, int) or b <= 0 for b in budgets):
        raise ConfigError(f"probe.low_data_budgets={tuple(budgets)} must be positive label counts")


def _check_probe_steps_kept(config: ml_collections.ConfigDict) -> None:
    """A probe in `config.then` asks only for checkpoint steps this pretraining run saves and keeps."""
    steps = [int(s) for s in config.probe.checkpoint_steps if int(s) != -1]
    if "probe" not in config.then or not steps:
        return
    every, keep = int(config.checkpoint.every_steps), int(config.checkpoint.max_to_keep)
    last = int(config.train.num_steps)
    kept = sorted(set(range(every, last + 1, every)) | {last})[-keep:]
    missing = [s for s in steps if s not in kept]
    if missing:
        raise ConfigError(
            f"probe.checkpoint_steps={tuple(config.probe.checkpoint_steps)}: step(s) {missing} will not be on disk "
            f"when the probe runs; this run keeps steps {kept} (a checkpoint every checkpoint.every_steps={every} "
            f"up to train.num_steps={last}, the last checkpoint.max_to_keep={keep}); ask for kept steps or raise "
            f"checkpoint.max_to_keep")


def _check_tracking(config: ml_collections.ConfigDict, dp: int | None) -> None:
    """Representation tracking (igpt_jax/probing/tracking.py); the subset's size against the data is checked
    by the pretraining job before it starts (it needs the dataset's split sizes)."""
    t = config.track
    _non_negative(t, "track", ("every",))
    if not t.every:
        return
    _positive(t, "track", ("train_examples", "val_examples"))
    if config.data.allow_unlabeled or config.data.fold_val or not config.data.val_fraction:
        why = ("data.allow_unlabeled=True (images without labels)" if config.data.allow_unlabeled else
               "data.fold_val=True (the validation images are trained on)" if config.data.fold_val else
               "data.val_fraction=0 (no validation split)")
        raise ConfigError(f"track.every={t.every} needs labelled training and held-out validation images, but "
                          f"{why}; set track.every=0 or change the data settings")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 for c in t.C):
        raise ConfigError(f"track.C={tuple(t.C)} must be positive inverse regularisation strengths (or () for probe.C)")
    try:
        linear_probe.ProbeSettings.from_config(config.probe)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{err} (track.every={t.every} probes with the probe settings)") from None
    _check_batch("probe.batch_size (the tracking batch)",
                 config.probe.batch_size or config.train.eval_batch_size or config.train.batch_size, dp)


def _check_checkpoint_source(config: ml_collections.ConfigDict) -> None:
    step = config.checkpoint.step
    if not isinstance(step, int) or step < -1:
        raise ConfigError(f"checkpoint.step={step!r} must be -1 (the latest) or a step >= 0")


def _check_batch(field: str, batch: Any, dp: int | None) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ConfigError(f"{field}={batch!r} must be positive")
    if dp and batch % dp:
        raise ConfigError(f"{field}={batch} is not divisible by the data-parallel size {dp} (the mesh axes the batch "
                          "is split over); choose a multiple of it or another mesh.shape")


def _no_repeats(section: ml_collections.ConfigDict, prefix: str, names: Sequence[str]) -> None:
    """Refuses a list setting that holds a value twice: given twice on the command line, a tuple setting does not
    replace the first list but appends to it (ml_collections' multi-flags), which would train or fit it twice."""
    for name in names:
        values = tuple(section[name])
        if len(set(values)) != len(values):
            raise ConfigError(f"{prefix}.{name}={values} holds a value twice; a tuple setting given twice on the "
                              f"command line appends the second list to the first, so give --config.{prefix}.{name} "
                              "once")


def _positive(section: ml_collections.ConfigDict, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = section[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}.{name}={value!r} must be positive")


def _non_negative(section: ml_collections.ConfigDict, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = section[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{prefix}.{name}={value!r} must be >= 0")


def _check_positive_number(section: ml_collections.ConfigDict, prefix: str, name: str) -> None:
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{prefix}.{name}={value!r} must be a positive number")


def _one_of(section: ml_collections.ConfigDict, prefix: str, name: str, choices: Sequence[str]) -> None:
    value = section[name]
    if value not in choices:
        raise ConfigError(f"{prefix}.{name}={value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
