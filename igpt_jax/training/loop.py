"""One training run's skeleton, the same for every job that trains (pretrain, finetune, vqvae).

A job builds what only it knows: its state and how to create it, its pure train step, its batches and what it
evaluates. `TrainingRun` does the rest, the same way for every job::

    with TrainingRun(run_dir, config.checkpoint, num_steps=..., log_every=...) as run:
        if run.already_finished():      # FINISHED names the newest checkpoint: says so, does nothing
            return run.finished_result()
        state = run.restore_or_create(abstract_state, create, data_iterator=..., config=config, tokens_per_step=...)
        state = run.train(state, train_step=..., next_batch=..., evaluations=[Evaluation(every, fn)])
        if run.stopped:                 # SIGTERM, SIGINT or stop_at_step: that step is saved
            return run.result
        ...                             # the job's final work: test evaluation, results files
        return run.finish()             # writes FINISHED

What it does for every job:

* Resume: from the newest checkpoint that reads back (`Checkpointer.restore_newest_readable`: an unreadable step is
  named and moved aside), after that step's stored config is checked against this invocation's
  (`igpt_jax.config.changes.check_resume`: a change is refused, or recorded in ``config_history.jsonl``; the settings
  in force go to ``config.json``).
* Steps: each step's metrics go to the run log (`igpt_jax.training.run_log.RunLog`; with the job's
  `igpt_jax.training.mfu.FlopsAccount` the progress line, ``metrics.jsonl`` and TensorBoard also get TFLOP/s per
  device and MFU) and are fetched every ``log_every`` steps, before each evaluation and before each save; a
  non-finite loss stops the run there, naming the last good checkpoint.
* Checkpoints: every ``checkpoint.every_steps`` steps, after an evaluation that changed the state, at the last step
  and when asked to stop. The metrics are on disk before each save, and ``segments.json`` (each invocation's steps
  and wall time) is written with it.
* Stop: SIGTERM (preemption) or SIGINT (Ctrl-C) saves the current step and returns with `stopped` set, naming the
  signal; ``stop_at_step`` does the same at a given step (drills, tests).
* Finished: `finish` writes ``FINISHED`` (the last step) after the job's final work, so that launch/relaunch.sh,
  which waits for it, stops only when the results are written. A run is finished when ``FINISHED`` names its newest
  checkpoint and that checkpoint is the last step (or, for a job that stops early, wherever it stopped).
* One writer: the run holds a lease on its workdir (`igpt_jax.training.lease`) from entering to leaving; a second
  run there is refused in one line naming the holder, a stale lease (a killed run) is taken over with a warning, and
  a run whose lease was taken over stops before it writes a metric or a checkpoint again.
* Storage: a failure to write (a full disk or quota, an unwritable workdir, a vanished bucket) is one line
  (`igpt_jax.errors.StorageError`) naming the path, the step being saved and the newest intact checkpoint, from
  which a rerun resumes once the cause is fixed.
* Cleanup: the checkpointer, the run log, the signal handlers and whatever the job hands to `close_later` are
  closed in one place, on leaving the ``with`` block, also after an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from igpt_jax import workdir as workdir_files
from igpt_jax.config import changes as config_changes
from igpt_jax.errors import MissingSource, StorageError, WorkdirInUse
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.training.lease import WorkdirLease
from igpt_jax.training.mfu import FlopsAccount
from igpt_jax.training.run_log import PreemptionWatcher, RunLog
from igpt_jax.training.segments import Segments
from igpt_jax.workdir import workpath_of

State = Any  # a job's train state: any pytree of arrays whose step count is the checkpoint's step
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Something a job evaluates while it trains: ``fn(step, state)`` every `every` steps and at the last step.

    `fn` records what it measures (in the run log, a file, the run's result); it returns a new state when the
    evaluation changes the state (fine-tuning's early-stopping record), and the run then saves a checkpoint at that
    step, or None when it does not. ``every`` = 0: never.
    """

    every: int
    fn: Callable[[int, State], State | None]
    setting: str = ""  # the setting that gives `every` (e.g. 'train.eval_every'), named in a warning


    def due(self, step: int, final: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or final)


def _names_storage_failures(method):
    """A `TrainingRun` method whose failure to write (an OSError: a full disk, an unwritable directory) is raised as
    one line naming the path, the step and the newest intact checkpoint (`Checkpointer.storage_failure`)."""

    @functools.wraps(method)
    def wrapped(self: TrainingRun, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            if isinstance(err, MissingSource):
                raise
            path = str(err.filename or self.run_dir)
            if self.ckpt is None:
                raise StorageError(f"could not write {path}: {err.strerror or err}") from err
            raise self.ckpt.storage_failure(err, step=self.step, path=path) from err

    return wrapped


def long_periods(num_steps: int, every_steps: int, evaluations: tuple[Evaluation, ...] | list[Evaluation] = ()
                 ) -> list[str]:
    """One warning line for each period longer than the run: it then acts only at the last step.

    Args:
      num_steps: the step the run ends at.
      every_steps: ``checkpoint.every_steps``.
      evaluations: the job's evaluations (each names its setting).
    """
    lines = []
    if every_steps > num_steps:
        lines.append(f"checkpoint.every_steps={every_steps} is longer than the run ({num_steps} steps): a checkpoint "
                     "is saved only at the last step (and on SIGTERM or Ctrl-C)")
    for e in evaluations:
        if e.every > num_steps:
            lines.append(f"{e.setting or 'an evaluation period'}={e.every} is longer than the run ({num_steps} "
                         "steps): it runs only at the last step")
    return lines


def finished_step(workpath) -> int | None:
    """The step that the workdir's ``FINISHED`` names, or None (no file, or not a step)."""
    path = workpath / workdir_files.FINISHED
    if not path.exists():
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else None


class TrainingRun:
    """One invocation of a training job in its run directory; a context manager (see the module docstring).

    Args:
      run_dir: the run's directory (local or gs://); created on entering.
      checkpoint: ``config.checkpoint`` (every_steps, max_to_keep, async_save, allow_changes).
      num_steps: the step the run ends at.
      log_every: fetch and log the metrics every this many steps.
      stop_at_step: act as if SIGTERM arrived at this step (drills, tests).
      stops_early: the job may end before num_steps (early stopping): a FINISHED that names the newest checkpoint
        then means finished wherever that checkpoint is.
      t_start: when the invocation started (time.time()), for segments.json; default: now.
    """

    def __init__(self, run_dir: str, checkpoint: ml_collections.ConfigDict, *, num_steps: int, log_every: int,
                 stop_at_step: int | None = None, stops_early: bool = False, t_start: float | None = None):
        self.run_dir, self.workpath = run_dir, workpath_of(run_dir)
        self.checkpoint_cfg = checkpoint
        self.num_steps, self.log_every, self.every_steps = int(num_steps), int(log_every), int(checkpoint.every_steps)
        self.stop_at_step, self.stops_early = stop_at_step, stops_early
        self.t_start = t_start
        self.primary = jax.process_index() == 0
        self.step, self.ckpt = 0, None
        self.stopped = False  # set when a signal (or stop_at_step) stopped the run: its step is saved
        self.result: dict[str, Any] = {}  # what run() returns; the job adds its own entries
        self._exit = contextlib.ExitStack()

    # ------------------------------------------------------------------------------------------------ opening
    @_names_storage_failures
    def __enter__(self) -> TrainingRun:
        if self.primary:
            self.workpath.mkdir(parents=True, exist_ok=True)
        self._take_lease()
        cfg = self.checkpoint_cfg
        self.ckpt = ckpt_lib.Checkpointer(self.run_dir, every_steps=self.every_steps, max_to_keep=cfg.max_to_keep,
                                          async_save=cfg.async_save)
        self._exit.callback(self.ckpt.close)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self._exit.close()  # in reverse order of opening: the signal handlers, the run log, ..., the checkpointer
            return
        try:  # leaving on an error: that error is the one to report, not what closing on a full disk raises next
            self._exit.close()
        except Exception as close_err:  # noqa: BLE001
            logging.info("while closing the run after an error: %s", close_err)

    def _take_lease(self) -> None:
        """Process 0 takes the workdir's lease (`igpt_jax.training.lease`) and tells the others the outcome.

        Raises:
          WorkdirInUse: another run holds the workdir (nothing has been written).
        """
        refused = None
        self.lease = None
        if self.primary:
            lease = WorkdirLease(self.workpath, take_over=bool(self.checkpoint_cfg.get("take_over", False)))
            try:
                self.lease = self._exit.enter_context(lease)
            except WorkdirInUse as err:
                refused = err
        self._raise_everywhere(refused, f"workdir {self.run_dir} is in use by another run")

    def _check_lease(self, *, read: bool = False) -> None:
        """Stops the run (every process) when another run has taken its workdir's lease since.

        Raises:
          WorkdirInUse: naming the new holder.
        """
        lost = None
        if self.lease is not None:
            try:
                self.lease.check(read=read)
            except WorkdirInUse as err:
                lost = err
        self._raise_everywhere(lost, f"another run took over workdir {self.run_dir}")

    @staticmethod
    def _raise_everywhere(error: WorkdirInUse | None, said: str) -> None:
        """Raises process 0's lease error (None: none) on every process; `said` is what the others say."""
        if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
            error = error or WorkdirInUse(f"{said} (process 0 says so)")
        if error is not None:
            raise error

    def close_later(self, close: Callable[[], Any]) -> None:
        """Calls `close` when the run is left (before what was opened earlier is closed)."""
        self._exit.callback(close)

    # ------------------------------------------------------------------------------------------------ finished?
    def already_finished(self) -> bool:
        """Whether an earlier invocation finished this run: FINISHED names the newest checkpoint, which is the last
        step (or, when the job stops early, any step). A run extended past its FINISHED step resumes."""
        latest = self.ckpt.latest_step()
        return (latest is not None and finished_step(self.workpath) == latest
                and (latest >= self.num_steps or self.stops_early))

    def finished_result(self) -> dict[str, Any]:
        """Says that the run is finished and that nothing is done; the result of such an invocation."""
        latest = self.ckpt.latest_step()
        logging.info("run in %s is already finished (checkpoint step %d of %d): nothing to do", self.run_dir, latest,
                     self.num_steps)
        print(f"Run already finished: {self.run_dir} holds step {latest} of {self.num_steps}. Nothing to do.",
              flush=True)
        return {"step": latest, "start_step": latest, "finished": True, "resumed": True}

    # ------------------------------------------------------------------------------------------------ start
    @_names_storage_failures
    def restore_or_create(self, abstract_state: State, create: Callable[[], State], *, data_iterator: Any,
                          config: ml_collections.ConfigDict, tokens_per_step: int, palette: np.ndarray | None = None,
                          check: Callable[[int, ml_collections.ConfigDict], None] | None = None,
                          flops: FlopsAccount | None = None) -> State:
        """The newest readable checkpoint's state, or `create()` when there is none; then opens the run log.

        Args:
          abstract_state: the state's shapes and shardings (Orbax's restore target).
          create: makes a new run's initial state.
          data_iterator: the training batches' iterator; its position is restored with the state and saved with it.
          config: the settings this invocation runs with: checked against the checkpoint's, settled into
            config.json, and stored with every checkpoint.
          tokens_per_step: the global batch's tokens (or pixels), for the progress line's throughput.
          palette: the palette's centres, stored with every checkpoint (jobs that read tokens).
          check: the job's own check of a step's stored config, before the resume rules.
          flops: the model's FLOP accounting (`igpt_jax.training.mfu`): the log then shows TFLOP/s per device and MFU.

        Raises:
          ConfigError: a change of settings that a resume may not make (nothing is written).
        """
        accepted: list = []

        def check_config(step: int, stored: ml_collections.ConfigDict) -> None:
            if check is not None:
                check(step, stored)
            accepted[:] = config_changes.check_resume(stored, config, step=step, workdir=self.run_dir,
                                                      allow_changes=bool(config.checkpoint.allow_changes))

        step, state = self.ckpt.restore_newest_readable(abstract_state, data_iterator=data_iterator,
                                                        check_config=check_config)
        if step is None:
            accepted.clear()  # no checkpoint restored: nothing changes
            state = create()
        else:
            logging.info("resumed from %s at step %d", self.ckpt.directory, step)
        self.start_step = self.step = 0 if step is None else step
        self.config, self.palette, self.data_iterator = config, palette, data_iterator
        if self.primary:
            config_changes.settle(self.workpath, self.start_step, accepted, config)
            # The run goes on (e.g. a finished run extended to more steps): an earlier FINISHED no longer holds, and
            # launch/relaunch.sh must not stop on it.
            (self.workpath / workdir_files.FINISHED).unlink(missing_ok=True)
        self._open_log(resumed=step is not None, tokens_per_step=tokens_per_step, flops=flops)
        return state

    def _open_log(self, *, resumed: bool, tokens_per_step: int, flops: FlopsAccount | None) -> None:
        self.log = RunLog(self.workpath, num_steps=self.num_steps, start_step=self.start_step,
                          tokens_per_step=tokens_per_step, local="://" not in self.run_dir, flops=flops)
        self._exit.callback(self.log.close)
        self.watcher = PreemptionWatcher(self.stop_at_step)
        self._exit.callback(self.watcher.close)
        self.segments = Segments(self.workpath, start_step=self.start_step, resumed=resumed, writer=self.primary,
                                 t_start=self.t_start)
        self.result.update(resumed=resumed, start_step=self.start_step)

    # ------------------------------------------------------------------------------------------------ the loop
    @_names_storage_failures
    def train(self, state: State, *, train_step: Callable[[State, Batch], tuple[State, dict[str, jax.Array]]],
              next_batch: Callable[[], Batch], evaluations: tuple[Evaluation, ...] | list[Evaluation] = (),
              stop_early: Callable[[State], bool] | None = None) -> State:
        """Runs the steps from `start_step` to `num_steps` (or until `stop_early(state)`, or a stop signal).

        Args:
          state: the restored or created state.
          train_step: ``(state, batch) -> (state, metrics)``, metrics holding at least ``loss``.
          next_batch: the next global batch.
          evaluations: what is evaluated after the steps they are due at, in this order.
          stop_early: whether the state says to stop before num_steps (early stopping).

        Returns:
          The state after the last step run; `stopped` says whether a signal ended the loop.
        """
        def done(s: State) -> bool:
            return stop_early is not None and stop_early(s)

        for line in long_periods(self.num_steps, self.every_steps, evaluations):
            logging.warning("%s", line)
        step = self.start_step
        while step < self.num_steps and not done(state):
            state, metrics = train_step(state, next_batch())
            step += 1
            self.step = step
            self.log.add(step, metrics)
            stop, final = self.watcher.should_stop(step), step == self.num_steps
            due = [e for e in evaluations if e.due(step, final)]
            save = final or stop or step % self.every_steps == 0
            if save or due or step % self.log_every == 0:
                self._check_lease()  # nothing is written over a run that took this workdir over
                self.log.flush(last_good=self.ckpt.latest_step(), directory=self.ckpt.directory)  # raises on NaN/Inf
            for evaluation in due:
                changed = evaluation.fn(step, state)
                if changed is not None:  # the checkpoint of this step holds what the evaluation recorded
                    state, save = changed, True
            if save:
                self._save(step, state)
            if stop and not (final or done(state)):
                self._stop(step)
                return state
        if "segments" not in self.result:  # nothing was left to run: the invocation's time is still recorded
            self.save_segments()
        self.ckpt.wait()
        return state

    def _save(self, step: int, state: State) -> None:
        self._check_lease(read=True)
        self.log.sync()  # every metric up to this step is on disk before the checkpoint is
        self.ckpt.save(step, state, data_iterator=self.data_iterator, config=self.config, palette=self.palette,
                       force=True)
        self.result["segments"] = self.segments.save(step)

    def _stop(self, step: int) -> None:
        self.ckpt.wait()
        logging.warning("preempted: checkpoint saved at step %d; exiting", step)
        print(f"Stopped by {self.watcher.signal_name} at step {step}; checkpoint saved in {self.ckpt.directory}.",
              flush=True)
        self.stopped = True
        self.result.update(step=step, preempted=True, history=self.log.history)

    # ------------------------------------------------------------------------------------------------ the end
    def save_segments(self) -> list[dict[str, float]]:
        """Records the run's wall time up to now (segments.json, and the result's ``segments``); returns it."""
        self.result["segments"] = self.segments.save(self.step)
        return self.result["segments"]

    @_names_storage_failures
    def finish(self) -> dict[str, Any]:
        """Writes FINISHED (call it after the job's final work) and returns the run's result."""
        if self.primary:
            (self.workpath / workdir_files.FINISHED).write_text(f"{self.step}\n")
        self.result.update(step=self.step, finished=True, history=self.log.history)
        return self.result
