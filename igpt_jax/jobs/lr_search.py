"""The learning-rate search job (paper 3.4): short pretraining runs down a ladder of learning rates.

Command:
  python -m igpt_jax.main --config=configs/cifar10_cpu.py:lr_search --workdir=workdirs/cifar10_lr_search
  (any pretraining config with ``--config.job=lr_search``; the ladder: ``--config.lr_search.lrs="(0.01, 0.003)"``)

Each trial is an ordinary pretraining run of the same model on the same data, in ``WORKDIR/lr_<lr>`` (e.g.
``lr_0.003/``): the config's run with ``train.lr`` set to the trial's rate and its schedule shrunk by
``lr_search.schedule_fraction`` (``train.num_steps``, the warmup and the checkpoint period; the cosine decays to 0
at the trial's last step; representation tracking off). The trials go from the largest rate down and stop at the
first local minimum of their final validation loss (the rule: `igpt_jax.training.lr_ladder`); a trial whose loss turns
NaN/Inf counts as +inf.

An interrupted search resumes: a trial that ended (finished or diverged) left ``lr_search_trial.json`` in its
workdir and is read back, not rerun (after checking its settings are this search's); an unfinished trial resumes
from its latest checkpoint like any pretraining run; a trial stopped by SIGTERM or Ctrl-C stops the search, and the
same command continues it.

Writes ``WORKDIR/lr_search.json`` (the trials, the picked rate, why the search stopped and the command of the full
run at the picked rate), ``lr_search.txt`` (the table, also printed) and ``lr_search.png`` (validation loss against
learning rate, log x). `config.then` does not apply: the full run's learning rate is known only at the end, so the
job prints its command instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shlex
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from igpt_jax import workdir as workdir_files
from igpt_jax.config import changes as config_changes
from igpt_jax.config import checks as config_checks
from igpt_jax.data import records
from igpt_jax.errors import ConfigError
from igpt_jax.training import lr_ladder, optim
from igpt_jax.workdir import jsonable, workpath_of

ENDED = ("finished", "diverged")  # a trial with one of these statuses is read back, not rerun


def trial_workdir(workdir: str, lr: float) -> str:
    """The trial's pretraining workdir: ``WORKDIR/lr_0.003``."""
    return f"{workdir.rstrip('/')}/lr_{lr:g}"


def _scaled(count: int, fraction: float) -> int:
    return max(1, int(round(count * fraction)))


def trial_config(config: ml_collections.ConfigDict, lr: float, *, steps_per_epoch: int | None = None
                 ) -> ml_collections.ConfigDict:
    """The pretraining config of the trial at `lr`: the config's run at this rate, its schedule shrunk.

    Args:
      config: the search's config (``config.job == 'lr_search'``).
      lr: the trial's peak learning rate.
      steps_per_epoch: steps in one epoch of the training split; needed when ``train.warmup_steps`` is -1.
    """
    fraction = float(config.lr_search.schedule_fraction)
    trial = config.copy_and_resolve_references()
    trial.job = "pretrain"
    trial.then = ()
    trial.train.lr = float(lr)
    trial.train.num_steps = _scaled(config.train.num_steps, fraction)
    warmup = optim.warmup_steps_for(config.train, steps_per_epoch or 1)  # -1: the full run's (shortened) epoch
    trial.train.warmup_steps = min(int(round(warmup * fraction)), trial.train.num_steps - 1)  # shorter than the trial
    trial.checkpoint.every_steps = _scaled(config.checkpoint.every_steps, fraction)
    trial.track.every = 0  # representation tracking is for full runs; a trial only compares validation losses
    return trial


def full_run_command(lr: float, workdir: str, argv: list[str] | None = None) -> str:
    """The command of the full pretraining run at `lr`: this command's ``--config`` arguments (from `argv`, default
    `sys.argv`) with the job set to pretrain and ``train.lr`` to `lr`, in ``WORKDIR/pretrain``."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept = []
    for i, arg in enumerate(args):
        if arg.startswith("--config") and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
            arg = f"{arg}={args[i + 1]}"  # the "--flag value" form
        if arg.startswith("--config") and "=" in arg:
            name = arg.split("=", 1)[0]
            if name not in ("--config.job", "--config.train.lr") and not name.startswith(
                    "--config.lr_search."):
                kept.append(arg)
    if not any(a.startswith("--config=") for a in kept):
        kept.insert(0, "--config=CONFIG")
    return shlex.join(["python", "-m", "igpt_jax.main", *kept, "--config.job=pretrain", f"--config.train.lr={lr:g}",
                       f"--workdir={workdir.rstrip('/')}/pretrain"])


def _read_record(trial_dir: str) -> dict[str, Any] | None:
    path = workpath_of(trial_dir) / workdir_files.LR_SEARCH_TRIAL
    return json.loads(path.read_text()) if path.exists() else None


def _write_record(trial_dir: str, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        path = workpath_of(trial_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / workdir_files.LR_SEARCH_TRIAL).write_text(json.dumps(jsonable(record), indent=2) + "\n")


def _check_same_settings(trial_dir: str, trial_cfg: ml_collections.ConfigDict) -> None:
    """A trial read back must have been run with this search's model, data and schedule."""
    stored = json.loads((workpath_of(trial_dir) / workdir_files.CONFIG_JSON).read_text())
    for field, old, new in config_changes.changes(stored, trial_cfg):
        if config_changes.kind_of(field) != "free":
            raise ConfigError(
                f"{trial_dir} holds a trial run with {field}={old!r}, but this search's trial has {field}={new!r} "
                "(a changed config or lr_search.schedule_fraction): use a new workdir or the earlier settings")


def _final_val_loss(trial_dir: str, steps: int) -> float:
    """The validation loss a finished run logged at its last step (its pretraining run had already ended)."""
    path = workpath_of(trial_dir) / workdir_files.METRICS
    if path.exists():
        for line in reversed(path.read_text().splitlines()):
            record = json.loads(line) if line.strip() else {}
            if record.get("step") == steps and "val_loss" in record:
                return float(record["val_loss"])
    raise ConfigError(
        f"{trial_dir} is finished but its validation loss at step {steps} is not in its metrics.jsonl: delete "
        "that directory to rerun the trial")


class _Trials:
    """Runs (or reads back) the trials of one search."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, devices, stop_at: tuple[int, int] | None):
        self.config, self.workdir, self.devices, self.stop_at = config, workdir, devices, stop_at
        self.pretrain = importlib.import_module(config_checks.JOBS["pretrain"][0])  # the job, as main runs it
        steps_per_epoch = None
        if config.train.warmup_steps == -1:
            n_train = records.num_examples(config.data, "train")
            steps_per_epoch = max(1, n_train // int(config.train.batch_size))  # as the pretraining job counts it
        self.steps_per_epoch = steps_per_epoch
        self.n_lrs = len(config.lr_search.lrs)

    def __call__(self, index: int, lr: float) -> lr_ladder.Trial | None:
        """The trial at `lr` (the `index`-th): read back when it ended, else run or resumed; None: interrupted."""
        trial_dir = trial_workdir(self.workdir, lr)
        trial_cfg = trial_config(self.config, lr, steps_per_epoch=self.steps_per_epoch)
        record = _read_record(trial_dir)
        if record is not None and record["status"] in ENDED:
            return self._read_back(index, lr, trial_dir, trial_cfg, record)
        earlier = float(record["seconds"]) if record is not None else 0.0  # the segments an interruption ended
        return self._run(index, lr, trial_dir, trial_cfg, earlier_seconds=earlier)

    def _read_back(self, index: int, lr: float, trial_dir: str, trial_cfg: ml_collections.ConfigDict,
                   record: dict[str, Any]) -> lr_ladder.Trial:
        """The trial an earlier search ended, after checking it ran with this search's settings."""
        _check_same_settings(trial_dir, trial_cfg)
        trial = lr_ladder.Trial(lr=lr, steps=int(record["steps"]), seconds=float(record["seconds"]),
                                val_loss=math.inf if record["val_loss"] is None else float(record["val_loss"]),
                                status=record["status"], reused=True)
        print(f"lr_search: trial {index + 1}/{self.n_lrs}, lr {lr:g}: {self._loss_text(trial)} (read back from "
              f"{trial_dir})", flush=True)
        return trial

    def _run(self, index: int, lr: float, trial_dir: str, trial_cfg: ml_collections.ConfigDict, *,
             earlier_seconds: float) -> lr_ladder.Trial | None:
        """Runs (or resumes) the trial's pretraining and records how it ended; None when a signal stopped it."""
        steps = int(trial_cfg.train.num_steps)
        print(f"lr_search: trial {index + 1}/{self.n_lrs}, lr {lr:g}: {steps} steps in {trial_dir}", flush=True)
        stop_at_step = self.stop_at[1] if self.stop_at is not None and self.stop_at[0] == index else None
        start = time.monotonic()
        error = None
        try:
            result = self.pretrain.run(trial_cfg, trial_dir, devices=self.devices, stop_at_step=stop_at_step)
        except FloatingPointError as err:  # the pretraining job's NaN/Inf guard
            result, error = {}, str(err)
        seconds = earlier_seconds + time.monotonic() - start
        if result.get("preempted"):
            _write_record(trial_dir, dict(lr=lr, steps=steps, status="interrupted", val_loss=None, seconds=seconds))
            return None
        val_loss = math.inf
        if error is None:
            val_loss = result.get("val_loss")
            val_loss = _final_val_loss(trial_dir, steps) if val_loss is None else float(val_loss)
            if not math.isfinite(val_loss):
                error, val_loss = f"validation loss is {val_loss}", math.inf
        trial = lr_ladder.Trial(lr=lr, steps=steps, val_loss=val_loss, seconds=seconds,
                                status="finished" if error is None else "diverged")
        _write_record(trial_dir, {**dataclasses.asdict(trial), "error": error})
        print(f"lr_search: trial {index + 1}/{self.n_lrs}, lr {lr:g}: {self._loss_text(trial)}"
              + (f" ({error})" if error else ""), flush=True)
        return trial

    @staticmethod
    def _loss_text(trial: lr_ladder.Trial) -> str:
        if trial.status == "diverged":
            return "diverged"
        return f"final validation loss {trial.val_loss:.4f} nats/token"


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, stop_at: tuple[int, int] | None = None
        ) -> dict[str, Any]:
    """Runs (or resumes) the learning-rate search in `workdir`; returns its outcome.

    Args:
      config: the full config (``config.job == 'lr_search'``).
      workdir: the search's directory (local or gs://); trial i runs in ``trial_workdir(workdir, lrs[i])``.
      devices: the devices of each trial's mesh (default: all).
      stop_at: (trial index, step): act as if preempted at that step of that trial (tests and drills).

    Returns:
      {'picked_lr' (None: none), 'stop' (an `igpt_jax.training.lr_ladder` reason), 'note', 'trials' (dicts), 'table',
      'command'}; or {'preempted': True, 'trials'} when a trial was stopped by a signal.
    """
    lrs = [float(x) for x in config.lr_search.lrs]
    logging.info("learning-rate search over %s, trials of %s of the schedule, in %s", lrs,
                 config.lr_search.schedule_fraction, workdir)
    outcome = lr_ladder.search(lrs, _Trials(config, workdir, devices=devices, stop_at=stop_at))
    trials = [dataclasses.asdict(t) for t in outcome.trials]
    if outcome.stop == lr_ladder.INTERRUPTED:
        print(f"lr_search: {outcome.note}.", flush=True)
        return {"preempted": True, "trials": trials}
    text = lr_ladder.table(outcome)
    command = full_run_command(outcome.picked_lr, workdir) if outcome.picked_lr is not None else None
    result = {"picked_lr": outcome.picked_lr, "stop": outcome.stop, "note": outcome.note, "trials": trials,
              "lrs": lrs, "schedule_fraction": float(config.lr_search.schedule_fraction), "command": command}
    if jax.process_index() == 0:
        workpath = workpath_of(workdir)
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / workdir_files.LR_SEARCH_RESULT).write_text(json.dumps(jsonable(result), indent=2) + "\n")
        (workpath / workdir_files.LR_SEARCH_TABLE).write_text(text)
        lr_ladder.plot(str(workpath / workdir_files.LR_SEARCH_PLOT), outcome)
    print(f"Learning-rate search ({len(outcome.trials)} of {len(lrs)} trials, {workdir}):\n{text}", end="", flush=True)
    if command:
        print(f"Full run at the picked learning rate:\n  {command}", flush=True)
    return {**result, "table": text}
