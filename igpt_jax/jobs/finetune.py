"""The fine-tuning job (``config.job = 'finetune'``, paper 2.3, 3.4, 4.5).

Initialises the model from a pretrained model (``config.checkpoint.source_workdir`` / ``step``: a pretraining run or
a converted model, read by `igpt_jax.pretrained.sources`; or randomly,
``finetune.init = 'random'``, the from-scratch baseline), attaches a zero-initialised, bias-free linear head to the
sequence mean of the final norm's output (or of block ``finetune.head_layer``'s ``ln_1`` output), and trains
L_GEN + L_CLF (or L_CLF alone) with Adam as in pretraining (``config.train``'s b1, b2, eps, clipping) at a constant
learning rate (optional linear warmup, no cosine), no dropout by default, on the training split with the data
pipeline's augmentation. Validation accuracy is measured at step 0 (the zero head) and every ``eval_every`` steps;
the best parameters are kept in ``{run}/best`` (early stopping: ``patience`` evaluations without improvement stop
the run); at the end the best parameters are scored on the test split. BERT models train on masked inputs and are
evaluated with ``bert_ensemble`` masks per example (modal prediction, ties at random).

The run directory is the workdir, or ``{workdir}/finetune`` when the workdir is also the pretraining source. The
run is driven by the training skeleton (`igpt_jax.training.loop.TrainingRun`), like pretraining: it resumes exactly
(state, early-stopping record and data position in the newest readable checkpoint; changed settings refused or
recorded), SIGTERM or SIGINT saves the current step, and at the end it writes ``results.json`` there, then
``FINISHED``; a rerun of a finished run (also one stopped early) says so and returns its results. A resumed run's
results name the pretrained source its first segment started from and count the wall time of every segment
(``segments``: steps and seconds of each invocation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.config import checks as config_checks
from igpt_jax.data import config as data_config
from igpt_jax.data import iterators, multihost, palette_cache, records
from igpt_jax.data.palette import Palette
from igpt_jax.models import objectives
from igpt_jax.models.igpt import IGPT, ModelConfig, ModelOutput, init_params
from igpt_jax.models.layout import Layout, layout_of, param_layout
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.training import mfu, optim
from igpt_jax.training.loop import Evaluation, TrainingRun
from igpt_jax.training.segments import total_seconds
from igpt_jax.workdir import jsonable

# Validation accuracy at every evaluation, kept in the run's own file (local or gs://), cut back on resume.


@flax.struct.dataclass
class FinetuneState:
    """Parameters ({'model': ..., 'head': {'w': [d, classes]}}), Adam state, and the early-stopping record."""

    step: jax.Array
    params: Any
    opt_state: Any
    best_accuracy: jax.Array  # float32; -1 before the first evaluation
    best_step: jax.Array  # int32
    evals_since_best: jax.Array  # int32
    initial_accuracy: jax.Array  # float32: validation accuracy of the zero-initialised head (step 0)


def head_param(d_model: int, num_classes: int) -> nn.LogicallyPartitioned:
    return nn.LogicallyPartitioned(jnp.zeros((d_model, num_classes), jnp.float32), names=("embed", "classes"))


def _state(params: Any, tx: optax.GradientTransformation) -> FinetuneState:
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         best_accuracy=jnp.full((), -1.0, jnp.float32), best_step=jnp.zeros((), jnp.int32),
                         evals_since_best=jnp.zeros((), jnp.int32), initial_accuracy=jnp.full((), -1.0, jnp.float32))


def state_layout(model_cfg: ModelConfig, num_classes: int, tx: optax.GradientTransformation, mesh, rules) -> Layout:
    """Shapes and shardings of the fine-tuning state (the head is ('embed', 'classes'))."""
    return layout_of(lambda rng: _state({"model": init_params(model_cfg, rng),
                                         "head": {"w": head_param(model_cfg.d_model, num_classes)}}, tx), mesh, rules)


def create_state(model_params: Any | None, model_cfg: ModelConfig, num_classes: int, tx, layout: Layout, mesh, rules,
                 rng: jax.Array) -> FinetuneState:
    """The initial state in its shardings: the given model parameters (or random ones) and a zero head."""
    def build(params, r):
        if params is None:
            params = nn.meta.unbox(init_params(model_cfg, r))
        return _state({"model": params, "head": {"w": jnp.zeros((model_cfg.d_model, num_classes), jnp.float32)}}, tx)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if model_params is None:
            return jax.jit(lambda r: build(None, r), out_shardings=layout.shardings)(rng)
        return jax.jit(build, out_shardings=layout.shardings, donate_argnums=0)(model_params, rng)


def head_features(out: ModelOutput, head_layer: int) -> jax.Array:
    """The head's input: the final norm's sequence mean (head_layer < 0) or block head_layer's ln_1 mean."""
    return out.final_features if head_layer < 0 else out.layer_features[:, head_layer]


def classifier_logits(params: Any, out: ModelOutput, head_layer: int) -> jax.Array:
    return jnp.dot(head_features(out, head_layer), params["head"]["w"], preferred_element_type=jnp.float32)


def finetune_step(state: FinetuneState, batch: dict[str, jax.Array], *, model_cfg: ModelConfig,
                  tx: optax.GradientTransformation, schedule: optax.Schedule, base_rng: jax.Array, head_layer: int,
                  use_gen: bool) -> tuple[FinetuneState, dict[str, jax.Array]]:
    """One optimizer step on L_CLF (+ L_GEN): pure, like `igpt_jax.training.step.train_step`.

    Returns:
      (new state, metrics: loss, clf_loss, gen_loss, train_accuracy, learning_rate, grad_norm).
    """
    tokens, labels = batch["tokens"], batch["label"]
    rng = jax.random.fold_in(base_rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    bert_mask = None
    if model_cfg.objective == "bert":
        bert_mask = objectives.sample_bert_mask(mask_rng, tokens.shape, model_cfg.bert_mask_rate)

    def loss_fn(params):
        out = IGPT(model_cfg).apply({"params": params["model"]}, tokens, bert_mask=bert_mask,
                                    deterministic=model_cfg.dropout == 0.0, features=True, logits=use_gen,
                                    rngs={"dropout": dropout_rng})
        logits = classifier_logits(params, out, head_layer)
        logp = jax.nn.log_softmax(logits, axis=-1)
        clf = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
        gen = jnp.zeros((), jnp.float32)
        if use_gen:
            gen, _ = objectives.masked_mean(objectives.token_nll(out.logits, tokens),
                                            objectives.loss_weights(tokens, bert_mask, None))
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return clf + gen, (clf, gen, acc)

    (loss, (clf, gen, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "clf_loss": clf, "gen_loss": gen, "train_accuracy": acc,
               "learning_rate": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def predict_step(params: Any, batch: dict[str, jax.Array], *, model_cfg: ModelConfig, head_layer: int,
                 num_masks: int, seed: int) -> dict[str, jax.Array]:
    """Class predictions [masks, batch] (BERT: one per mask, each a function of the record index)."""
    tokens = batch["tokens"]
    preds = []
    for m in range(num_masks if model_cfg.objective == "bert" else 1):
        mask = None
        if model_cfg.objective == "bert":
            mask = features_lib.bert_masks(features_lib.mask_key(seed, m), batch["index"], tokens.shape[1],
                                           model_cfg.bert_mask_rate)
        out = IGPT(model_cfg).apply({"params": params["model"]}, tokens, bert_mask=mask, features=True, logits=False)
        preds.append(jnp.argmax(classifier_logits(params, out, head_layer), axis=-1).astype(jnp.int32))
    return {"predictions": jnp.stack(preds), "label": batch["label"], "mask": batch["mask"], "index": batch["index"]}


class Evaluator:
    """Accuracy of the head over a whole split (mask-ensembled for BERT)."""

    def __init__(self, model_cfg, layout: Layout, mesh, rules, data_cfg, palette, *, batch_size: int, head_layer: int,
                 num_masks: int, seed: int, num_classes: int):
        self.mesh, self.rules, self.data_cfg, self.palette = mesh, rules, data_cfg, palette
        self.batch_size, self.num_classes, self.seed = batch_size, num_classes, seed
        self.num_masks = num_masks if model_cfg.objective == "bert" else 1
        self.fn = jax.jit(
            lambda p, b: predict_step(p, b, model_cfg=model_cfg, head_layer=head_layer, num_masks=self.num_masks,
                                      seed=seed),
            in_shardings=(layout.shardings.params, sharding.batch_sharding(mesh, rules)),
            out_shardings=sharding.replicated(mesh))

    def accuracy(self, params: Any, split: str) -> dict[str, float]:
        rows = multihost.host_rows(self.batch_size, self.mesh, sharding.batch_axes(self.rules))
        it = iterators.make_iterator(self.data_cfg, split, batch_size=rows.size, train=False, seed=0,
                                         palette=self.palette, rows=rows)
        preds, labels, masks = [], [], []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for local in it:
                batch = multihost.make_global_batch({k: local[k] for k in ("tokens", "label", "mask", "index")},
                                                        self.mesh, sharding.batch_axes(self.rules), rows)
                out = jax.device_get(self.fn(params, batch))
                preds.append(out["predictions"])
                labels.append(out["label"])
                masks.append(out["mask"])
        keep = np.concatenate(masks)
        preds, labels = np.concatenate(preds, axis=1)[:, keep], np.concatenate(labels)[keep]
        rng = np.random.default_rng(self.seed)
        result = {"accuracy": linear_probe.accuracy(
            linear_probe.modal_prediction(preds, self.num_classes, rng), labels), "examples": int(len(labels))}
        if preds.shape[0] > 1:
            result["accuracy_single_mask"] = linear_probe.accuracy(preds[0], labels)
        return result


def run_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The workdir, or ``{workdir}/finetune`` when the workdir is also the pretraining run (its checkpoints)."""
    source = config.checkpoint.source_workdir or workdir
    same = os.path.abspath(source) == os.path.abspath(workdir) if "://" not in workdir else source == workdir
    if config.finetune.init == "pretrained" and same:
        return os.path.join(workdir, "finetune")
    return workdir


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, stop_at_step: int | None = None
        ) -> dict[str, Any]:
    """Runs (or resumes) fine-tuning; returns the results (also written to ``{run dir}/results.json``).

    Args:
      config: the full config (``config.finetune``, ``config.train`` for Adam, ``config.checkpoint``, ``config.data``).
      workdir: the job's workdir (see `run_directory`).
      devices: the mesh's devices (default: all).
      stop_at_step: act as if preempted at this step (tests, drills).

    Raises:
      FileNotFoundError: no pretraining checkpoint where it should be.
      ValueError: a model config that disagrees with the checkpoint, a number of classes that disagrees with the
        dataset (or with the head of the checkpoint being resumed), bad options (`igpt_jax.config.checks`).
    """
    t_start = time.time()
    fcfg = config.finetune
    config_checks.validate(config, num_devices=len(devices) if devices is not None else jax.device_count())
    if config.data.fold_val:
        logging.warning("data.fold_val=True: the validation split used for early stopping is part of the training "
                        "data; use it only for a final run with a fixed number of steps")
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    batch_size = int(fcfg.batch_size or config.train.batch_size)
    with TrainingRun(run_directory(config, workdir), config.checkpoint, num_steps=int(fcfg.num_steps),
                     log_every=int(fcfg.log_every), stop_at_step=stop_at_step, stops_early=int(fcfg.patience) > 0,
                     t_start=t_start) as run:
        if run.already_finished():
            return {**_read_results(run.workpath), **run.finished_result()}
        start = starting_point(config, workdir, run)
        schedule = optim.learning_rate_schedule(float(fcfg.lr), warmup_steps=int(fcfg.warmup_steps),
                                                total_steps=int(fcfg.num_steps), kind="constant")
        tx = optim.make_optimizer(config.train, schedule)
        layout = state_layout(start.model_cfg, start.num_classes, tx, mesh, rules)
        train_rows = multihost.host_rows(batch_size, mesh, sharding.batch_axes(rules))
        train_iter = iterators.make_iterator(start.data_cfg, "train", batch_size=train_rows.size,
                                                 rows=train_rows, train=True, seed=config.seed, palette=start.palette)
        base_rng = jax.random.key(config.seed)
        state = run.restore_or_create(
            layout.abstract, lambda: start.initial_state(tx, layout, mesh, rules, jax.random.fold_in(base_rng, 1)),
            data_iterator=train_iter, config=start.stored_config(config), palette=start.palette.centres,
            tokens_per_step=batch_size * start.data_cfg.resolution**2,
            flops=mfu.FlopsAccount.of(start.model_cfg, mesh.devices, start.data_cfg.resolution**2))
        step_fn = jax.jit(
            lambda s, b: finetune_step(s, b, model_cfg=start.model_cfg, tx=tx, schedule=schedule,
                                       base_rng=jax.random.fold_in(base_rng, 2), head_layer=start.head_layer,
                                       use_gen=fcfg.objective == "gen+clf"),
            in_shardings=(layout.shardings, sharding.batch_sharding(mesh, rules)),
            out_shardings=(layout.shardings, sharding.replicated(mesh)), donate_argnums=0)
        evaluator = Evaluator(start.model_cfg, layout, mesh, rules, start.data_cfg, start.palette,
                              batch_size=int(fcfg.eval_batch_size or batch_size), head_layer=start.head_layer,
                              num_masks=max(1, int(fcfg.bert_ensemble)), seed=config.seed,
                              num_classes=start.num_classes)
        stopping = EarlyStopping(run, evaluator, layout, patience=int(fcfg.patience))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if run.start_step == 0 and float(state.best_accuracy) < 0:
                state = stopping.evaluate(0, state)  # the zero-initialised head
            state = run.train(
                state, train_step=step_fn, evaluations=[Evaluation(int(fcfg.eval_every), stopping.evaluate,
                                                                       setting="finetune.eval_every")],
                stop_early=stopping.stopped, next_batch=lambda: multihost.make_global_batch(
                    {k: v for k, v in next(train_iter).items() if k in ("tokens", "label")}, mesh,
                    sharding.batch_axes(rules), train_rows))
        if run.stopped:
            return run.result
        results = final_results(config, start, state, stopping, run)  # before FINISHED
        table = format_table(results)
        if run.primary:
            (run.workpath / workdir_files.RESULTS).write_text(json.dumps(jsonable(results), indent=2))
            print(table, flush=True)
            print(f"Fine-tuning results: {run.workpath / workdir_files.RESULTS}", flush=True)
        return {**run.finish(), **results, "table": table}


@dataclasses.dataclass
class StartingPoint:
    """What a fine-tuning run starts from: the model, tokens and classes, and the source of its parameters.

    Resuming: everything from the run's own checkpoint (its parameters are restored with the state). Otherwise a
    pretrained source (a run's checkpoint or a converted model, `source`) or, with ``finetune.init='random'``, the
    config's model with random parameters.
    """

    model_cfg: ModelConfig
    palette: Palette
    data_cfg: ml_collections.ConfigDict
    num_classes: int
    head_layer: int  # -1: the final norm
    where: str  # what the settings come from, for messages
    source: pretrained.Source | None = None  # where a new run's parameters are read (None: random, or resuming)
    source_step: int | None = None
    source_name: str | None = None  # the pretrained checkpoint the run's first segment started from

    def initial_state(self, tx, layout: Layout, mesh, rules, rng: jax.Array) -> FinetuneState:
        """A new run's state: the source's parameters (or random ones) and a zero head."""
        model_params = None
        if self.source is not None:
            model_params = self.source.restore_params(self.source_step, param_layout(self.model_cfg, mesh, rules))
            logging.info("fine-tuning from %s", self.where)
        return create_state(model_params, self.model_cfg, self.num_classes, tx, layout, mesh, rules, rng)

    def stored_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The config the run's checkpoints store: the job's, with the model, data and head it really runs."""
        saved = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
        saved.model = dataclasses.asdict(self.model_cfg)
        saved.data = self.data_cfg.to_dict()
        saved.finetune.num_classes = self.num_classes
        saved.finetune.head_layer = self.head_layer
        saved.checkpoint.step = -1 if self.source_step is None else self.source_step
        saved.finetune.source_checkpoint = self.source_name
        return saved


def starting_point(config: ml_collections.ConfigDict, workdir: str, run: TrainingRun) -> StartingPoint:
    """The run's `StartingPoint`: its own newest checkpoint when resuming, else the pretrained source or random init.

    Raises:
      FileNotFoundError: no pretrained source where the config says. ValueError: classes, head layer or settings
        that disagree with the dataset, the source or the checkpoint being resumed.
    """
    fcfg, latest = config.finetune, run.ckpt.latest_step()
    num_classes = records.num_classes(config.data)
    if fcfg.num_classes and int(fcfg.num_classes) != num_classes:
        raise ValueError(f"finetune.num_classes={fcfg.num_classes} but dataset {config.data.name!r} (data_dir "
                         f"{data_config.resolve_data_dir(config.data.data_dir)}) has {num_classes} classes")
    if latest is not None:  # resuming: everything from our own checkpoint
        where = f"checkpoint {run.ckpt.directory}/{latest}"
        saved = run.ckpt.restore_config(latest)
        model_cfg = pretrained.model_config_for_job(config.model, ModelConfig.from_config(saved.model), where=where)
        data_cfg = pretrained.data_config_for_job(
            config.data, {k: int(saved.data[k]) for k in pretrained.DATA_FIELDS}, model_cfg, where=where)
        if int(saved.finetune.num_classes) != num_classes:
            raise ValueError(f"{where} has a head for {saved.finetune.num_classes} classes but dataset "
                             f"{config.data.name!r} has {num_classes}: use a new workdir for a different dataset")
        start = StartingPoint(model_cfg, Palette(run.ckpt.restore_palette(latest)), data_cfg, num_classes, -1, where,
                              source_step=int(saved.checkpoint.step))
        if fcfg.init == "pretrained":  # as the first segment named it (checkpoints written before it was kept: step)
            start.source_name = saved.finetune.get("source_checkpoint") or (
                f"step {start.source_step} of {pretrained.source_path(saved, workdir)}")
    elif fcfg.init == "pretrained":
        source = pretrained.open_source(config, workdir)
        run.close_later(source.close)
        step = source.resolve_step(int(config.checkpoint.step))
        model_cfg, palette, data_cfg = source.settings(config, step)
        start = StartingPoint(model_cfg, palette, data_cfg, num_classes, -1, source.where(step), source, step,
                              source.where(step))
    else:
        where = "config.model (random init)"
        model_cfg = ModelConfig.from_config(config.model)
        palette = palette_cache.load_or_fit_palette(config.data)
        data_cfg = pretrained.data_config_for_job(
            config.data, {k: int(config.data[k]) for k in pretrained.DATA_FIELDS}, model_cfg, where=where)
        if palette.k != model_cfg.vocab_size:
            raise ValueError(
                f"data.n_colors={palette.k} differs from model.vocab_size={model_cfg.vocab_size} ({where})")
        start = StartingPoint(model_cfg, palette, data_cfg, num_classes, -1, where)
    start.model_cfg = start.model_cfg.replace(dropout=float(fcfg.dropout))
    head_layer = int(fcfg.head_layer)
    if not -1 <= head_layer <= start.model_cfg.n_layer:
        raise ValueError(
            f"finetune.head_layer={head_layer} must be -1 (final norm) or in [0, {start.model_cfg.n_layer}]")
    start.head_layer = -1 if head_layer == start.model_cfg.n_layer else head_layer
    return start


class EarlyStopping:
    """Validation accuracy at each evaluation, the best parameters kept in ``{run}/best``, and the early stop.

    The record (best accuracy and step, evaluations since the best, the zero head's accuracy) is part of the state,
    so a resumed run continues it; every evaluation is also kept in ``val_history.json`` (cut back to the resumed
    step), metrics.jsonl and TensorBoard (``val/accuracy``).
    """

    def __init__(self, run: TrainingRun, evaluator: Evaluator, layout: Layout, *, patience: int):
        self.run, self.evaluator, self.layout, self.patience = run, evaluator, layout, patience
        self.best = ckpt_lib.Checkpointer(str(run.workpath / workdir_files.FINETUNE_BEST), every_steps=1,
                                          max_to_keep=1, async_save=False)
        run.close_later(self.best.close)
        # Evaluations after the restored step are redone, so their records are dropped.
        earlier = _read_list(run.workpath / workdir_files.VAL_HISTORY)
        self.history = [rec for rec in earlier if rec["step"] <= run.start_step]

    def stopped(self, state: FinetuneState) -> bool:
        """Whether `patience` evaluations in a row did not improve on the best (0: never stop early)."""
        return self.patience > 0 and int(state.evals_since_best) >= self.patience

    def evaluate(self, step: int, state: FinetuneState) -> FinetuneState:
        """Measures validation accuracy at `step` and records it; returns the state with the updated record."""
        acc = self.evaluator.accuracy(state.params, "validation")
        extra = {}
        if step == 0 and float(state.initial_accuracy) < 0:
            extra["initial_accuracy"] = jnp.float32(acc["accuracy"])
        if acc["accuracy"] > float(state.best_accuracy):
            if step not in self.best.all_steps():
                self.best.save(step, state.params, force=True)
                self.best.wait()
            state = state.replace(best_accuracy=jnp.float32(acc["accuracy"]), best_step=jnp.int32(step),
                                  evals_since_best=jnp.int32(0), **extra)
        else:
            state = state.replace(evals_since_best=jnp.int32(int(state.evals_since_best) + 1), **extra)
        state = jax.device_put(state, self.layout.shardings)
        logging.info("step %d: validation accuracy %.4f (best %.4f at step %d)", step, acc["accuracy"],
                     float(state.best_accuracy), int(state.best_step))
        rec = {"step": step, "val_accuracy": acc["accuracy"], **(
            {"val_accuracy_single_mask": acc["accuracy_single_mask"]} if "accuracy_single_mask" in acc else {})}
        self.history.append(rec)
        if self.run.primary:
            (self.run.workpath / workdir_files.VAL_HISTORY).write_text(json.dumps(self.history))
        self.run.log.append([rec])
        if self.run.log.writer:
            self.run.log.writer.scalars(step, {"val/accuracy": acc["accuracy"]})
        if self.stopped(state):
            logging.info("early stop at step %d: %d evaluations without improvement", step, self.patience)
        return state


def final_results(config: ml_collections.ConfigDict, start: StartingPoint, state: FinetuneState,
                 stopping: EarlyStopping, run: TrainingRun) -> dict[str, Any]:
    """The best parameters' accuracy on the test split, and the run's results (``results.json``)."""
    best_step = int(state.best_step)
    best_params = stopping.best.restore(best_step, stopping.layout.abstract.params)
    test = stopping.evaluator.accuracy(best_params, "test")
    del best_params
    by_step = {h["step"]: h["val_accuracy"] for h in stopping.history}
    results = {
        "job": "finetune",
        "run_dir": str(run.workpath),
        "init": config.finetune.init,
        "source_checkpoint": start.source_name,
        "pretrained_step": start.source_step,
        "objective": config.finetune.objective,
        "head_layer": start.head_layer,
        "dataset": config.data.name,
        "num_classes": start.num_classes,
        "steps": int(state.step),
        "early_stopped": stopping.stopped(state),
        "initial_val_accuracy": by_step.get(0, float(state.initial_accuracy)),
        "best_step": best_step,
        "best_val_accuracy": by_step.get(best_step, float(state.best_accuracy)),
        "test_accuracy": test["accuracy"],
        **({"test_accuracy_single_mask": test["accuracy_single_mask"]} if "accuracy_single_mask" in test else {}),
        "bert_masks": stopping.evaluator.num_masks,
        "val_history": stopping.history,
        "config": start.stored_config(config).to_dict(),
        "segments": run.save_segments(),  # the test evaluation's time included
    }
    results["seconds"] = total_seconds(results["segments"])
    return results


def _read_results(workpath: epath.Path) -> dict[str, Any]:
    """The results a finished run wrote (none: {})."""
    path = workpath / workdir_files.RESULTS
    return json.loads(path.read_text()) if path.exists() else {}


def _read_list(path: epath.Path) -> list[dict[str, float]]:
    """The records a previous segment of this run wrote to `path` (none for a new run)."""
    return json.loads(path.read_text()) if path.exists() else []


def format_table(results: dict[str, Any]) -> str:
    pct = linear_probe.format_percent
    head = "final norm" if results["head_layer"] < 0 else f"block {results['head_layer']} ln_1"
    lines = [
        f"Fine-tuning: {results['dataset']} ({results['num_classes']} classes), init {results['init']}"
        + (f" from {results['source_checkpoint']}" if results["source_checkpoint"] else "")
        + f", objective {results['objective']}, head on {head}",
        f"{'step':>8}  {'val %':>6}",
    ]
    for rec in results["val_history"]:
        mark = " *" if rec["step"] == results["best_step"] else ""
        lines.append(f"{rec['step']:>8}  {pct(rec['val_accuracy'])}{mark}")
    lines.append(f"zero-initialised head: validation {pct(results['initial_val_accuracy']).strip()}%")
    lines.append(f"best: step {results['best_step']}, validation {pct(results['best_val_accuracy']).strip()}%, "
                 f"test {pct(results['test_accuracy']).strip()}%"
                 + (f" ({results['bert_masks']}-mask ensemble; one mask: "
                    f"{pct(results['test_accuracy_single_mask']).strip()}%)" if "test_accuracy_single_mask" in results
                    else "")
                 + (" (early stopped)" if results["early_stopped"] else ""))
    return "\n".join(lines)
