"""The pretraining job: palette tokens -> global sharded batches -> train step -> Orbax.

Resumes from the workdir's latest checkpoint (state, data position), says so and exits 0 when the run is already
finished, stops with the step on a NaN/Inf loss (the last good checkpoint stays), and on SIGTERM (preemption) saves
the current step and exits cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import optim, sharding, train
from igpt_jax.data import pipeline as data_pipeline
from igpt_jax.metric_writers import ProgressLogger, TensorBoardWriter
from igpt_jax.model import ModelConfig, count_params

FINISHED_MARKER = "FINISHED"


class PreemptionWatcher:
    """Turns SIGTERM into a request to checkpoint and stop, agreed on by all processes at the same step."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self._stop_at_step = stop_at_step  # behaves as if SIGTERM arrived at this step (tests, drills)
        self._requested = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._stop_at_step is not None and step >= self._stop_at_step:
            return True
        if jax.process_count() > 1:
            # JAX's preemption service catches SIGTERM on every host and agrees on a common step.
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class RunLog:
    """The run's metrics: progress lines, TensorBoard, and ``metrics.jsonl`` (local workdirs), from process 0.

    Metrics stay on the device until a flush, so logging never stalls the step pipeline; a flush fetches every
    pending step, raises on the first non-finite loss, and records them all.
    """

    def __init__(self, workpath: epath.Path, *, num_steps: int, start_step: int, tokens_per_step: int, local: bool):
        primary = jax.process_index() == 0
        self.progress = ProgressLogger(num_steps, start_step=start_step, tokens_per_step=tokens_per_step)
        self.writer = TensorBoardWriter(str(workpath / "tensorboard")) if primary else None
        self.metrics_file = workpath / "metrics.jsonl" if primary and local else None
        self.pending: list[tuple[int, Any]] = []
        self.history: list[dict[str, float]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def flush(self, *, last_good: int | None, directory) -> None:
        fetched = jax.device_get(self.pending)
        self.pending = []
        records = []
        for step, metrics in fetched:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                where = f"step {last_good} in {directory}" if last_good is not None else "none saved yet"
                raise FloatingPointError(f"loss is {loss} at step {step}; stopping. Last good checkpoint: {where}")
            records.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if not records:
            return
        self.history.extend(records)
        self._append(records)
        last = records[-1]
        self.progress.log(last["step"], last)
        if self.writer:
            self.writer.scalars(last["step"], {f"train/{k}": v for k, v in last.items() if k != "step"})

    def validation(self, step: int, val: dict[str, float]) -> None:
        logging.info("step %d: validation loss %.4f nats/token (%.4f bits/token) over %d tokens", step, val["nll"],
                     val["bits_per_token"], int(val["tokens"]))
        self._append([{"step": step, "val_loss": val["nll"], "val_bits_per_token": val["bits_per_token"]}])
        if self.history and self.history[-1]["step"] == step:
            self.history[-1]["val_loss"] = val["nll"]
        if self.writer:
            self.writer.scalars(step, {"val/loss": val["nll"], "val/bits_per_token": val["bits_per_token"]})

    def _append(self, records: list[dict[str, float]]) -> None:
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def evaluate(eval_fn, params, data_cfg, split: str, *, global_batch: int, mesh, rules, rng, max_batches: int = 0,
             palette=None) -> dict[str, float]:
    """Exact mean NLL (nats and bits per token) over a split (or its first `max_batches` global batches, the same
    examples for any number of processes)."""
    rows = data_pipeline.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    it = data_pipeline.make_iterator(data_cfg, split, batch_size=rows.size, train=False, seed=0, palette=palette,
                                     rows=rows)
    nll_sum, count = 0.0, 0.0
    for i, local in enumerate(it):
        if max_batches and i >= max_batches:
            break
        batch = data_pipeline.make_global_batch(local, mesh, sharding.batch_axes(rules), rows)
        out = jax.device_get(eval_fn(params, batch, jax.random.fold_in(rng, i)))
        nll_sum += float(out["nll_sum"])
        count += float(out["count"])
    nats = nll_sum / max(count, 1.0)
    return {"nll": nats, "bits_per_token": nats / math.log(2), "tokens": count}


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
    model_cfg = ModelConfig.from_config(config.model)
    data_cfg, train_cfg = config.data, config.train
    workpath = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
    if jax.process_index() == 0:
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / "config.json").write_text(config.to_json_best_effort(indent=2))
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
    rows = data_pipeline.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    logging.info("mesh %s on %d devices (%d processes); global batch %d, rows %s in this process",
                 dict(mesh.shape), mesh.size, jax.process_count(), global_batch, rows)

    # ---------------------------------------------------------------- input pipeline
    palette = data_pipeline.load_or_fit_palette(data_cfg)
    n_train = data_pipeline.num_examples(data_cfg, "train")
    steps_per_epoch = max(1, n_train // global_batch)
    train_iter = data_pipeline.make_iterator(
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
    if latest is not None:
        state = ckpt.restore(latest, layout.abstract, data_iterator=train_iter)
        logging.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state = train.create_state(model_cfg, tx, layout, mesh, rules, jax.random.fold_in(base_rng, 1))
    start_step = int(jax.device_get(state.step))

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
    result: dict[str, Any] = {"resumed": latest is not None, "start_step": start_step}

    # ---------------------------------------------------------------- loop
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = start_step
            while step < num_steps:
                batch = data_pipeline.make_global_batch(next(train_iter), mesh, sharding.batch_axes(rules), rows)
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
                if save_now:
                    ckpt.save(step, state, data_iterator=train_iter, force=True, **save_kwargs)
                if stop and not final:
                    ckpt.wait()
                    logging.warning("preempted: checkpoint saved at step %d; exiting", step)
                    print(f"Stopped by SIGTERM at step {step}; checkpoint saved in {ckpt.directory}.", flush=True)
                    result.update(step=step, preempted=True, history=log.history)
                    return result
        ckpt.wait()
        if jax.process_index() == 0:
            (workpath / FINISHED_MARKER).write_text(f"{num_steps}\n")
        summary = log.progress.summary()
        logging.info("%s", summary)
        print(f"Pretraining done: {num_steps} steps in {workdir}. {summary}", flush=True)
        result.update(step=num_steps, finished=True, history=log.history,
                      final_loss=log.history[-1]["loss"] if log.history else None)
        return result
    finally:
        watcher.close()
        log.close()
        ckpt.close()
