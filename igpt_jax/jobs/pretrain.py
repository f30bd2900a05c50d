"""The pretraining job: palette tokens -> global sharded batches -> train step -> Orbax.

Resumes from the workdir's newest readable checkpoint (state, data position; an unreadable step is named, moved to
``checkpoints_unreadable/`` and the one before it used), says so and exits 0 when the run is already finished, stops
with the step on a NaN/Inf loss (the last good checkpoint stays), and on SIGTERM (preemption) or SIGINT (Ctrl-C)
saves the current step and exits cleanly. A resumed run may not change its architecture or data, needs
``checkpoint.allow_changes`` to change optimizer or schedule settings (`igpt_jax.config.changes`), and writes
``config.json`` once its settings are accepted. Metrics reach disk before each checkpoint is saved; what a killed run
logged after its last checkpoint is dropped on resume (`igpt_jax.training.run_log.RunLog`). With ``track.every`` > 0 every layer
is probed on a fixed labelled subset every that many steps (`igpt_jax.probing.tracking`). Each invocation's
wall time is kept in ``segments.json`` (`igpt_jax.training.segments.Segments`), so the whole run's time survives resumes.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from igpt_jax import sharding
from igpt_jax.config import changes as config_changes
from igpt_jax.data import iterators, multihost, palette_cache, records
from igpt_jax.models.igpt import ModelConfig, count_params
from igpt_jax.probing import tracking as representation_tracking
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.training import optim
from igpt_jax.training import step as train
from igpt_jax.training.run_log import FINISHED_MARKER, PreemptionWatcher, RunLog
from igpt_jax.training.segments import Segments, total_seconds
from igpt_jax.training.validation import evaluate
from igpt_jax.workdir import workpath_of


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, stop_at_step: int | None = None
        ) -> dict[str, Any]:
    """Runs (or resumes) pretraining in `workdir`; returns the final metrics.

    Args:
      config: the full config (``config.job == 'pretrain'``).
      workdir: the run directory (local or gs://).
      devices: the devices of the mesh (default: all).
      stop_at_step: act as if preempted at this step: checkpoint and return (for tests and preemption drills).
    """
    # ---------------------------------------------------------------- set-up and config checks
    t_start = time.time()
    model_cfg = ModelConfig.from_config(config.model)
    data_cfg, train_cfg = config.data, config.train
    workpath = workpath_of(workdir)
    representation_tracking.check_subset(config)  # the tracking subset fits in the data (before any work)
    if jax.process_index() == 0:
        workpath.mkdir(parents=True, exist_ok=True)
    if data_cfg.n_colors != model_cfg.vocab_size:
        raise ValueError(
            f"data.n_colors={data_cfg.n_colors} differs from model.vocab_size={model_cfg.vocab_size}: "
            "the palette size is the model's vocabulary"
        )
    if data_cfg.resolution**2 > model_cfg.n_ctx:
        raise ValueError(
            f"data.resolution={data_cfg.resolution} gives sequences of {data_cfg.resolution**2} tokens, longer than "
            f"model.n_ctx={model_cfg.n_ctx}"
        )

    # ---------------------------------------------------------------- mesh
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    global_batch = int(train_cfg.batch_size)
    sharding.check_batch_divides(global_batch, mesh, rules)
    accum = int(train_cfg.grad_accum_steps)
    if accum < 1 or global_batch % accum or (global_batch // accum) % sharding.data_parallel_size(mesh, rules):
        raise ValueError(
            f"train.grad_accum_steps={accum} must divide train.batch_size={global_batch} into micro-batches "
            f"divisible by the data-parallel size {sharding.data_parallel_size(mesh, rules)}"
        )
    rows = multihost.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    logging.info("mesh %s on %d devices (%d processes); global batch %d, rows %s in this process",
                 dict(mesh.shape), mesh.size, jax.process_count(), global_batch, rows)

    # ---------------------------------------------------------------- input pipeline
    palette = palette_cache.load_or_fit_palette(data_cfg)
    n_train = records.num_examples(data_cfg, "train")
    steps_per_epoch = max(1, n_train // global_batch)
    train_iter = iterators.make_iterator(
        data_cfg, "train", batch_size=rows.size, train=True, seed=config.seed, palette=palette, rows=rows
    )
    batch_shardings = sharding.batch_sharding(mesh, rules)  # a prefix: every batch field splits its leading dim

    # ---------------------------------------------------------------- model and optimizer
    num_steps = int(train_cfg.num_steps)
    warmup = optim.warmup_steps_for(train_cfg, steps_per_epoch)
    schedule = optim.learning_rate_schedule(train_cfg.lr, warmup_steps=warmup, total_steps=num_steps,
                                            kind=train_cfg.schedule)
    tx = optim.make_optimizer(train_cfg, schedule)
    layout = train.state_layout(model_cfg, tx, mesh, rules)
    logging.info("model: %s parameters (%d layers, width %d, %d heads, context %d, vocabulary %d, objective %s)",
                 f"{count_params(model_cfg):,}", model_cfg.n_layer, model_cfg.d_model, model_cfg.n_head,
                 model_cfg.n_ctx, model_cfg.vocab_size, model_cfg.objective)
    logging.info("schedule: %d steps (%.2f epochs of %d images), warmup %d, peak lr %g, %s", num_steps,
                 num_steps / steps_per_epoch, n_train, warmup, train_cfg.lr, train_cfg.schedule)

    # ---------------------------------------------------------------- checkpoint: resume or start
    ckpt = ckpt_lib.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                 max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
    base_rng = jax.random.key(config.seed)
    latest = ckpt.latest_step()
    if latest is not None and latest >= num_steps:
        logging.info("run in %s is already finished (checkpoint step %d of %d): nothing to do", workdir, latest,
                     num_steps)
        print(f"Run already finished: {workdir} holds step {latest} of {num_steps}. Nothing to do.", flush=True)
        ckpt.close()
        return {"step": latest, "finished": True, "resumed": True}
    accepted: list = []

    def check_config(step: int, stored: ml_collections.ConfigDict) -> None:
        accepted[:] = config_changes.check_resume(stored, config, step=step, workdir=workdir,
                                                  allow_changes=bool(config.checkpoint.allow_changes))

    try:
        restored_step, state = (None, None) if latest is None else ckpt.restore_newest_readable(
            layout.abstract, data_iterator=train_iter, check_config=check_config)
    except BaseException:  # a refused config change: nothing was written
        ckpt.close()
        raise
    if restored_step is not None:
        logging.info("resumed from %s at step %d", ckpt.directory, restored_step)
    else:
        accepted.clear()  # no checkpoint restored: nothing changes
        state = train.create_state(model_cfg, tx, layout, mesh, rules, jax.random.fold_in(base_rng, 1))
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        config_changes.settle(workpath, start_step, accepted, config)

    # ---------------------------------------------------------------- steps
    step_fn = train.jitted_train_step(model_cfg, tx, schedule, layout, batch_shardings, mesh, accum_steps=accum)
    step_rng = jax.random.fold_in(base_rng, 2)
    eval_fn = train.jit_eval_step(model_cfg, layout, batch_shardings, mesh)
    eval_batch = int(train_cfg.eval_batch_size or global_batch)
    eval_rng = jax.random.fold_in(base_rng, 3)

    # ---------------------------------------------------------------- logging
    log = RunLog(workpath, num_steps=num_steps, start_step=start_step,
                 tokens_per_step=global_batch * data_cfg.resolution**2, local="://" not in workdir)
    watcher = PreemptionWatcher(stop_at_step)
    save_kwargs = dict(config=config, palette=palette.centres)
    result: dict[str, Any] = {"resumed": restored_step is not None, "start_step": start_step}
    segments = Segments(workpath, start_step=start_step, resumed=restored_step is not None,
                        writer=jax.process_index() == 0, t_start=t_start)

    # ---------------------------------------------------------------- loop
    try:
        tracker = representation_tracking.make_tracker(config, model_cfg, layout, mesh, rules, palette, workpath,
                                                       start_step=start_step)
        if tracker:
            result["tracking"] = tracker.history  # every evaluation of the run, earlier segments' included
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = start_step
            while step < num_steps:
                batch = multihost.make_global_batch(next(train_iter), mesh, sharding.batch_axes(rules), rows)
                state, metrics = step_fn(state, batch, step_rng)
                step += 1
                log.add(step, metrics)
                stop = watcher.should_stop(step)
                final = step == num_steps
                evaluate_now = bool(train_cfg.eval_every) and (step % train_cfg.eval_every == 0 or final)
                save_now = final or stop or step % config.checkpoint.every_steps == 0
                if save_now or evaluate_now or step % train_cfg.log_every == 0:
                    log.flush(last_good=ckpt.latest_step(), directory=ckpt.directory)  # raises on NaN/Inf
                if evaluate_now:
                    val = evaluate(eval_fn, state.params, data_cfg, "validation",
                                   global_batch=eval_batch, mesh=mesh, rules=rules, rng=eval_rng,
                                   max_batches=train_cfg.eval_batches, palette=palette)
                    log.validation(step, val)
                    result["val_loss"] = val["nll"]
                if tracker and tracker.due(step, final):
                    log.scalars(step, tracker.evaluate(step, state.params).scalars())
                    log.notes["track"] = tracker.progress_note()
                if save_now:
                    log.sync()  # every metric up to this step is on disk before the checkpoint is
                    ckpt.save(step, state, data_iterator=train_iter, force=True, **save_kwargs)
                    result["segments"] = segments.save(step)
                if stop and not final:
                    ckpt.wait()
                    logging.warning("preempted: checkpoint saved at step %d; exiting", step)
                    print(f"Stopped by {watcher.signal_name} at step {step}; checkpoint saved in {ckpt.directory}.", flush=True)
                    result.update(step=step, preempted=True, history=log.history)
                    return result
        ckpt.wait()
        if jax.process_index() == 0:
            (workpath / FINISHED_MARKER).write_text(f"{num_steps}\n")
        summary = log.progress.summary()
        logging.info("%s", summary)
        seconds = total_seconds(result["segments"])
        print(f"Pretraining done: {num_steps} steps in {workdir} ({seconds / 60:.1f} min over "
              f"{len(result['segments'])} invocation(s)). {summary}", flush=True)
        result.update(step=num_steps, finished=True, history=log.history,
                      final_loss=log.history[-1]["loss"] if log.history else None)
        return result
    finally:
        watcher.close()
        log.close()
        ckpt.close()
