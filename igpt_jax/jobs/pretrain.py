"""The pretraining job: palette tokens -> global sharded batches -> train step -> Orbax.

Runs on the training skeleton (`igpt_jax.training.loop.TrainingRun`): resumes from the workdir's newest readable
checkpoint (state, data position; an unreadable step is named, moved to ``checkpoints_unreadable/`` and the one
before it used), says so and exits 0 when the run is already finished, stops with the step on a NaN/Inf loss (the
last good checkpoint stays), and on SIGTERM (preemption) or SIGINT (Ctrl-C) saves the current step and exits
cleanly. A resumed run may not change its architecture or data, needs ``checkpoint.allow_changes`` to change
optimizer or schedule settings (`igpt_jax.config.changes`), and writes ``config.json`` once its settings are
accepted. Metrics reach disk before each checkpoint is saved; what a killed run logged after its last checkpoint is
dropped on resume. Each invocation's wall time is kept in ``segments.json``, and ``FINISHED`` is written at the end.

What this job adds: the validation NLL every ``train.eval_every`` steps and, with ``track.every`` > 0, a probe of
every layer on a fixed labelled subset every that many steps (`igpt_jax.probing.tracking`).
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from igpt_jax import sharding
from igpt_jax.config import checks as config_checks
from igpt_jax.data import iterators, multihost, palette_cache, records
from igpt_jax.models.igpt import ModelConfig, count_params
from igpt_jax.probing import tracking as representation_tracking
from igpt_jax.training import mfu, optim
from igpt_jax.training import step as train
from igpt_jax.training.loop import Evaluation, TrainingRun
from igpt_jax.training.segments import total_seconds
from igpt_jax.training.validation import evaluate


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, stop_at_step: int | None = None
        ) -> dict[str, Any]:
    """Runs (or resumes) pretraining in `workdir`; returns the final metrics.

    Args:
      config: the full config (trained as a pretraining run whatever ``config.job`` says: the learning-rate search's
        trials and the VQ-VAE pipeline call this job too).
      workdir: the run directory (local or gs://).
      devices: the devices of the mesh (default: all).
      stop_at_step: act as if preempted at this step: checkpoint and return (for tests and preemption drills).

    Raises:
      ConfigError: a setting the config checks refuse (as main would), or a resume that may not change a setting.
    """
    t_start = time.time()
    check_settings(config, num_devices=len(devices) if devices is not None else jax.device_count())
    model_cfg, data_cfg, train_cfg = ModelConfig.from_config(config.model), config.data, config.train
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    global_batch, num_steps = int(train_cfg.batch_size), int(train_cfg.num_steps)
    rows = multihost.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    logging.info("mesh %s on %d devices (%d processes); global batch %d, rows %s in this process",
                 dict(mesh.shape), mesh.size, jax.process_count(), global_batch, rows)
    palette = palette_cache.load_or_fit_palette(data_cfg)
    train_iter = iterators.make_iterator(
        data_cfg, "train", batch_size=rows.size, train=True, seed=config.seed, palette=palette, rows=rows)
    logging.info("model: %s parameters (%d layers, width %d, %d heads, context %d, vocabulary %d, objective %s)",
                 f"{count_params(model_cfg):,}", model_cfg.n_layer, model_cfg.d_model, model_cfg.n_head,
                 model_cfg.n_ctx, model_cfg.vocab_size, model_cfg.objective)
    schedule = learning_rate_schedule(config)
    tx = optim.make_optimizer(train_cfg, schedule)
    layout = train.state_layout(model_cfg, tx, mesh, rules)
    base_rng = jax.random.key(config.seed)

    with TrainingRun(workdir, config.checkpoint, num_steps=num_steps, log_every=train_cfg.log_every,
                     stop_at_step=stop_at_step, t_start=t_start) as run:
        if run.already_finished():
            return run.finished_result()
        state = run.restore_or_create(
            layout.abstract, lambda: train.create_state(model_cfg, tx, layout, mesh, rules,
                                                        jax.random.fold_in(base_rng, 1)),
            data_iterator=train_iter, config=config, palette=palette.centres,
            tokens_per_step=global_batch * data_cfg.resolution**2,
            flops=mfu.FlopsAccount.of(model_cfg, mesh.devices, data_cfg.resolution**2))
        step_fn = train.jitted_train_step(model_cfg, tx, schedule, layout, sharding.batch_sharding(mesh, rules), mesh,
                                          accum_steps=int(train_cfg.grad_accum_steps))
        step_rng = jax.random.fold_in(base_rng, 2)
        evaluations = evaluations_of(config, run, model_cfg, layout, mesh, rules, palette, base_rng)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            run.train(state, train_step=lambda s, b: step_fn(s, b, step_rng), evaluations=evaluations,
                      next_batch=lambda: multihost.make_global_batch(next(train_iter), mesh,
                                                                         sharding.batch_axes(rules), rows))
        if run.stopped:
            return run.result
        result = run.finish()
    summary = run.log.progress.summary()
    logging.info("%s", summary)
    print(f"Pretraining done: {num_steps} steps in {workdir} ({total_seconds(result['segments']) / 60:.1f} min over "
          f"{len(result['segments'])} invocation(s)). {summary}", flush=True)
    result["final_loss"] = result["history"][-1]["loss"] if result["history"] else None
    return result


def check_settings(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """The checks main runs before this job (`igpt_jax.config.checks.validate`, as a pretraining run), and that the
    representation-tracking subset fits in the data: before any work, for callers that do not go through main."""
    as_pretraining = config.copy_and_resolve_references()
    as_pretraining.job = "pretrain"
    config_checks.validate(as_pretraining, num_devices=num_devices)
    representation_tracking.check_subset(config)


def learning_rate_schedule(config: ml_collections.ConfigDict):
    """The run's schedule: warmup (``train.warmup_steps``; -1: one epoch), then cosine or constant."""
    train_cfg = config.train
    n_train = records.num_examples(config.data, "train")
    steps_per_epoch = max(1, n_train // int(train_cfg.batch_size))
    warmup = optim.warmup_steps_for(train_cfg, steps_per_epoch)
    num_steps = int(train_cfg.num_steps)
    logging.info("schedule: %d steps (%.2f epochs of %d images), warmup %d, peak lr %g, %s", num_steps,
                 num_steps / steps_per_epoch, n_train, warmup, train_cfg.lr, train_cfg.schedule)
    return optim.learning_rate_schedule(train_cfg.lr, warmup_steps=warmup, total_steps=num_steps,
                                        kind=train_cfg.schedule)


def evaluations_of(config: ml_collections.ConfigDict, run: TrainingRun, model_cfg: ModelConfig, layout, mesh, rules,
                   palette, base_rng: jax.Array) -> list[Evaluation]:
    """What pretraining evaluates while it trains: the validation NLL every ``train.eval_every`` steps (each one in
    the log and the result's ``val_loss``) and representation tracking every ``track.every`` steps."""
    train_cfg = config.train
    eval_fn = train.jit_eval_step(model_cfg, layout, sharding.batch_sharding(mesh, rules), mesh)
    eval_batch = int(train_cfg.eval_batch_size or train_cfg.batch_size)
    eval_rng = jax.random.fold_in(base_rng, 3)

    def validation(step: int, state: train.TrainState) -> None:
        val = evaluate(eval_fn, state.params, config.data, "validation", global_batch=eval_batch, mesh=mesh,
                       rules=rules, rng=eval_rng, max_batches=train_cfg.eval_batches, palette=palette)
        run.log.validation(step, val)
        run.result["val_loss"] = val["nll"]

    evaluations = [Evaluation(int(train_cfg.eval_every), validation, setting="train.eval_every")]
    tracker = representation_tracking.make_tracker(config, model_cfg, layout, mesh, rules, palette, run.workpath,
                                                   start_step=run.start_step)
    if tracker:
        run.result["tracking"] = tracker.history  # every evaluation of the run, earlier segments' included

        def track(step: int, state: train.TrainState) -> None:
            run.log.scalars(step, tracker.evaluate(step, state.params).scalars())
            run.log.notes["track"] = tracker.progress_note()

        evaluations.append(Evaluation(tracker.every, track, setting="track.every"))
    return evaluations
