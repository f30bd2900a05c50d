"""The learning-rate search (paper 3.4): the stopping rule on scripted losses, the job's trials (diverged, read back,
resumed after an interruption) and its bad-input checks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from tiny_runs import pretrain_config

from igpt_jax import workdir as workdir_files
from igpt_jax.config import checks as config_checks
from igpt_jax.errors import ConfigError
from igpt_jax.jobs import lr_search
from igpt_jax.training import lr_ladder

REPO = Path(__file__).resolve().parents[1]
LADDER = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def scripted(losses):
    """A trial runner that returns `losses` in order and records the learning rates it was asked for."""
    asked = []

    def run_trial(index, lr):
        asked.append(lr)
        return lr_ladder.Trial(lr=lr, steps=10, val_loss=losses[index], seconds=1.0)

    return run_trial, asked


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("losses,tried,picked,stop", [
    ([3.0, 2.5, 2.2, 2.4, 2.0], 4, 1e-3, lr_ladder.LOCAL_MINIMUM),  # 2.0 after the rise is never tried
    ([3.0, 2.5, 2.5, 2.6, 1.0], 4, 1e-3, lr_ladder.LOCAL_MINIMUM),  # a tie is no rise
    ([2.0, 2.1, 1.0, 0.5, 0.1], 2, 1e-2, lr_ladder.LOCAL_MINIMUM),  # the ladder's top is the minimum
    ([3.0, 2.9, 2.8, 2.7, 2.6], 5, 1e-4, lr_ladder.LADDER_END),
    ([math.nan, math.inf, 2.5, 2.6, 1.0], 4, 1e-3, lr_ladder.LOCAL_MINIMUM),  # divergence at the top is passed over
    ([2.5, math.nan, 1.0, 0.5, 0.1], 2, 1e-2, lr_ladder.LOCAL_MINIMUM),  # divergence after a finite loss is a rise
    ([math.nan] * 5, 5, None, lr_ladder.ALL_DIVERGED),
])
def test_search_stops_at_the_first_local_minimum(losses, tried, picked, stop):
    run_trial, asked = scripted(losses)
    outcome = lr_ladder.search(LADDER, run_trial)
    assert asked == list(LADDER[:tried])
    assert (outcome.picked_lr, outcome.stop) == (picked, stop)
    assert [t.lr for t in outcome.trials] == list(LADDER[:tried])


def test_notes_and_table_say_what_was_picked_and_why():
    notes = {}
    for losses in ([3.0, 2.5, 2.7], [2.0, 2.5], [3.0, 2.5], [math.nan, math.nan]):
        outcome = lr_ladder.search(LADDER[:len(losses)], scripted(losses)[0])
        notes[outcome.stop, outcome.picked_lr] = outcome.note
    assert notes == {
        (lr_ladder.LOCAL_MINIMUM, 3e-3): "picked lr 0.003: the first local minimum of the validation loss",
        (lr_ladder.LOCAL_MINIMUM, 1e-2): "picked lr 0.01, the ladder's largest: the loss rose at 0.003, but no larger "
                                         "lr was tried",
        (lr_ladder.LADDER_END, 3e-3): "the ladder ended while the validation loss still fell: picked its smallest lr "
                                      "0.003; extend lr_search.lrs below it to find the minimum",
        (lr_ladder.ALL_DIVERGED, None): "every trial diverged, down to lr 0.003: extend lr_search.lrs below it",
    }
    outcome = lr_ladder.search(LADDER[:3], scripted([math.nan, 2.5, 2.75])[0])
    assert lr_ladder.table(outcome).splitlines() == [
        "       lr    steps   val loss       time",
        "--------------------------------------------",
        "     0.01       10   diverged       1.0s",
        "    0.003       10     2.5000       1.0s  <- picked",
        "    0.001       10     2.7500       1.0s",
        "picked lr 0.003: the first local minimum of the validation loss",
    ]


def test_an_interrupted_trial_stops_the_search_without_a_pick():
    def run_trial(index, lr):
        return None if index == 1 else lr_ladder.Trial(lr=lr, steps=1, val_loss=3.0, seconds=0.0)

    outcome = lr_ladder.search(LADDER, run_trial)
    assert (len(outcome.trials), outcome.picked_lr, outcome.stop) == (1, None, lr_ladder.INTERRUPTED)


# ------------------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="session")
def data_dir(digits_data_dir):
    """The session's digits data_dir (tests/conftest.py)."""
    return digits_data_dir


def search_config(data_dir, lrs=(1e-2, 3e-3)):
    """The tiny digits run (8 steps) searched with trials of half its schedule: 4 steps, evaluated at the end."""
    config = pretrain_config(data_dir, num_steps=8, warmup_steps=2, eval_every=4, eval_batches=1)
    config.checkpoint.every_steps = 8
    config.job = "lr_search"
    config.lr_search.lrs = lrs
    config.lr_search.schedule_fraction = 0.5
    return config_checks.resolve(config)


def test_trial_config_is_the_run_at_that_lr_with_its_schedule_shrunk(data_dir):
    config = search_config(data_dir)
    config.lr_search.schedule_fraction = 0.25
    config.track.every = 4
    trial = lr_search.trial_config(config, 3e-4)
    assert (trial.job, trial.then, trial.train.lr, trial.train.num_steps, trial.train.warmup_steps,
            trial.checkpoint.every_steps, trial.track.every) == ("pretrain", (), 3e-4, 2, 0, 2, 0)
    config.train.warmup_steps = -1  # one epoch: of the full run's 80 steps 40, of the trial's 20 steps 10
    config.train.num_steps = 80
    assert lr_search.trial_config(config, 3e-4, steps_per_epoch=40).train.warmup_steps == 10
    config.train.num_steps = 8  # an epoch longer than the run: the run's warmup is shortened to 0 (optim)
    assert lr_search.trial_config(config, 3e-4, steps_per_epoch=40).train.warmup_steps == 0
    assert (config.job, config.train.lr, config.train.num_steps) == ("lr_search", 3e-3, 8)  # unchanged
    assert lr_search.trial_workdir("gs://b/run/", 3e-4) == "gs://b/run/lr_0.0003"


def test_full_run_command_keeps_the_config_and_sets_the_picked_lr():
    argv = ["--config=configs/lr_search_cifar10.py", "--config.train.lr=1", "--config.lr_search.lrs=(1, 0.1)",
            "--config.seed", "3", "--workdir=w", "--config.job=lr_search"]
    assert lr_search.full_run_command(3e-3, "runs/s/", argv) == (
        "python -m igpt_jax.main --config=configs/lr_search_cifar10.py --config.seed=3 --config.job=pretrain "
        "--config.train.lr=0.003 --workdir=runs/s/pretrain")
    assert lr_search.full_run_command(1e-3, "w", []).startswith("python -m igpt_jax.main --config=CONFIG ")


def test_diverged_trials_count_as_infinite_and_ended_trials_are_read_back(data_dir, tmp_path, monkeypatch):
    """The job's bookkeeping with the pretraining run replaced: a NaN guard's error is a diverged trial; a rerun
    reads every ended trial back and runs none."""
    from igpt_jax.jobs import pretrain  # noqa: PLC0415  (the module the search runs through the jobs registry)

    def fake_pretrain(config, workdir, **_):
        os.makedirs(workdir, exist_ok=True)
        Path(workdir, "config.json").write_text(config.to_json_best_effort())
        if config.train.lr > 5e-3:
            raise FloatingPointError("loss is nan at step 3; stopping. Last good checkpoint: none saved yet")
        return {"finished": True, "val_loss": {3e-3: 2.0, 1e-3: 2.25}[config.train.lr]}

    monkeypatch.setattr(pretrain, "run", fake_pretrain)
    config = search_config(data_dir, lrs=(1e-2, 3e-3, 1e-3, 3e-4))
    out = lr_search.run(config, str(tmp_path))
    assert (out["picked_lr"], out["stop"]) == (3e-3, lr_ladder.LOCAL_MINIMUM)
    assert [(t["lr"], t["val_loss"], t["status"]) for t in out["trials"]] == [
        (1e-2, math.inf, "diverged"), (3e-3, 2.0, "finished"), (1e-3, 2.25, "finished")]
    saved = json.loads((tmp_path / "lr_search.json").read_text())
    assert saved["picked_lr"] == 3e-3 and saved["trials"][0]["val_loss"] is None  # strict JSON
    assert (tmp_path / "lr_search.txt").read_text() == out["table"]
    assert (tmp_path / "lr_search.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "lr_0.0003").exists()
    trial = json.loads((tmp_path / "lr_0.01" / workdir_files.LR_SEARCH_TRIAL).read_text())
    assert trial["status"] == "diverged" and trial["error"].startswith("loss is nan at step 3")

    monkeypatch.setattr(pretrain, "run", lambda *a, **k: pytest.fail("an ended trial was run again"))
    again = lr_search.run(config, str(tmp_path))
    assert [t["reused"] for t in again["trials"]] == [True, True, True]
    assert again["table"] == out["table"] and again["picked_lr"] == 3e-3
    config.lr_search.schedule_fraction = 0.25
    with pytest.raises(ConfigError, match=r"lr_0.01 holds a trial run with train.num_steps=4, but this "
                                                        r"search's trial has train.num_steps=2"):
        lr_search.run(config, str(tmp_path))


def test_interrupted_search_resumes_and_matches_an_uninterrupted_one(data_dir, tmp_path):
    """Real tiny pretraining trials: a search stopped in its second trial (as by SIGTERM) and run again reads the
    first trial back, resumes the second from its checkpoint, and ends with the uninterrupted search's table."""
    config = search_config(data_dir)
    one_device = jax.devices()[:1]
    full = lr_search.run(config, str(tmp_path / "full"), devices=one_device)
    assert [t["steps"] for t in full["trials"]] == [4, 4] and all(math.isfinite(t["val_loss"]) for t in full["trials"])

    first = lr_search.run(config, str(tmp_path / "resumed"), devices=one_device, stop_at=(1, 2))
    assert first["preempted"] and len(first["trials"]) == 1
    finished = tmp_path / "resumed" / "lr_0.01" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    second = lr_search.run(config, str(tmp_path / "resumed"), devices=one_device)
    assert [t["reused"] for t in second["trials"]] == [True, False]
    assert finished.stat().st_mtime_ns == before  # the first trial was not run again

    def key(result):
        return [(t["lr"], t["steps"], t["val_loss"], t["status"]) for t in result["trials"]]

    assert key(second) == key(full)  # bit-exact validation losses
    assert (second["picked_lr"], second["stop"]) == (full["picked_lr"], full["stop"])
    strip_time = [line[:30] for line in full["table"].splitlines()]
    assert [line[:30] for line in second["table"].splitlines()] == strip_time


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field,value,message", [
    ("lrs", (), "lr_search.lrs=() must be a non-empty tuple of learning rates, largest first, e.g. "
                '--config.lr_search.lrs="(0.01, 0.003, 0.001)"'),
    ("lrs", (1e-3, 3e-3), "lr_search.lrs=(0.001, 0.003) must be strictly descending (the search goes from large to "
                          "small)"),
    ("lrs", (1e-2, 1e-2), "lr_search.lrs=(0.01, 0.01) must be strictly descending (the search goes from large to "
                          "small)"),
    ("lrs", (1e-2, 0.0), "lr_search.lrs=(0.01, 0.0) must hold positive finite numbers"),
    ("lrs", (1e-2, -1e-3), "lr_search.lrs=(0.01, -0.001) must hold positive finite numbers"),
    ("schedule_fraction", 0.0, "lr_search.schedule_fraction=0.0 must lie in (0, 1]"),
    ("schedule_fraction", 1.5, "lr_search.schedule_fraction=1.5 must lie in (0, 1]"),
])
def test_bad_search_settings_are_one_line_config_errors(data_dir, field, value, message):
    config = search_config(data_dir)
    config.lr_search[field] = value
    with pytest.raises(ConfigError) as err:
        config_checks.validate(config)
    assert str(err.value) == message


def test_search_needs_a_validation_loss(data_dir):
    config = search_config(data_dir)
    config.train.eval_every = 0
    with pytest.raises(ConfigError, match=r"^train.eval_every=0: the learning-rate search compares"):
        config_checks.validate(config)


def test_bad_ladder_on_the_command_line_fails_before_any_work(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "tfds"))
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", "--config=configs/lr_search_cifar10.py",
         "--config.lr_search.lrs=(0.001, 0.01)", f"--workdir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == ["error: lr_search.lrs=(0.001, 0.01) must be strictly descending (the "
                                          "search goes from large to small)"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()
