"""The training skeleton (igpt_jax/training/loop.py), tested once for every job that runs on it: pretrain, finetune,
vqvae. A run killed with SIGKILL resumes bit-exactly; SIGTERM and SIGINT save the current step and the stop message
names the signal; a finished run writes FINISHED, and a rerun says it is finished and changes nothing."""

import json
import os
import shutil
import signal
from pathlib import Path

import cli_runner
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_runs import SHORT_STEPS, TRAINING_JOBS, metric_records, short_training_config

from igpt_jax.config import checks as config_checks
from igpt_jax.jobs import finetune, pretrain, vqvae
from igpt_jax.training.run_log import RunLog

ONE = jax.devices()[:1]
JOB_MODULES = {"pretrain": pretrain, "finetune": finetune, "vqvae": vqvae}


def data_and_source(request, job: str) -> tuple[str, str]:
    """(data_dir, source workdir) of a job's tiny run: fine-tuning reads the session's pretraining run. Every job
    reads the data_dir of that run, which all xdist workers share, so that `uninterrupted` can be shared too."""
    data_dir, source = request.getfixturevalue("pretrained_digits_run")
    return data_dir, source if job == "finetune" else ""


def job_config(request, job: str):
    """The job's short run (`tiny_runs.short_training_config`), resolved as the command line resolves it."""
    return config_checks.resolve(short_training_config(job, *data_and_source(request, job)))


def run_job(job: str, config, workdir: Path, **kwargs) -> dict:
    return JOB_MODULES[job].run(config, str(workdir), devices=ONE, **kwargs)


def checkpoint_steps(workdir: Path) -> list[int]:
    """The complete steps (Orbax writes a step under a temporary name and renames it when it is complete)."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def final_state(workdir: Path):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(SHORT_STEPS) / "state")


def every_file(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def uninterrupted(request, build_once):
    """job -> (config, workdir, result) of the job's short run without interruption, made once per job and session."""
    made = {}

    def get(job: str):
        if job not in made:
            config = job_config(request, job)
            made[job] = build_once(f"uninterrupted_{job}",
                                   lambda workdir: (config, workdir, run_job(job, config, workdir)))
        return made[job]

    return get


def kill_after_first_checkpoint(job: str, data_dir: str, source: str, workdir: Path, output: Path) -> list[int]:
    """Starts the job's short run through the command line, SIGKILLs it once its first checkpoint is complete (it
    then saves at every step) and returns the complete steps left on disk."""
    cli_runner.kill_when([f"--config=tests/tiny_runs.py:{job},{data_dir},{source}", f"--workdir={workdir}"],
                         lambda: bool(checkpoint_steps(workdir)), output)
    return checkpoint_steps(workdir)


@pytest.mark.parametrize("job", TRAINING_JOBS)
def test_a_run_killed_after_its_first_checkpoint_resumes_bit_exactly(job, request, uninterrupted, tmp_path):
    config, full_dir, full = uninterrupted(job)
    data_dir, source = data_and_source(request, job)
    for attempt in range(3):  # a stalled test process can miss the short run's middle: then kill a fresh run again
        workdir = tmp_path / f"killed{attempt}"
        killed_at = kill_after_first_checkpoint(job, data_dir, source, workdir, tmp_path / "output")
        if killed_at and killed_at[-1] < SHORT_STEPS:
            break
    assert killed_at and killed_at[-1] < SHORT_STEPS, (tmp_path / "output").read_text()[-3000:]
    assert not (workdir / "FINISHED").exists()

    resumed = run_job(job, config, workdir)
    assert resumed["resumed"] and resumed["finished"] and 1 <= resumed["start_step"] <= killed_at[-1]
    losses = [h["loss"] for h in full["history"]]
    assert [h["loss"] for h in resumed["history"]] == losses[resumed["start_step"]:]
    # What the killed run logged after its last checkpoint was dropped: every step once, every value bit-exact.
    assert metric_records(workdir) == metric_records(full_dir)
    jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(full_dir))
    segments = json.loads((workdir / "segments.json").read_text())
    assert [s["from_step"] for s in segments] == [0, resumed["start_step"]] and segments[-1]["to_step"] == SHORT_STEPS
    assert (workdir / "FINISHED").read_text() == f"{SHORT_STEPS}\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)  # preemption, Ctrl-C
@pytest.mark.parametrize("job", TRAINING_JOBS)
def test_sigterm_or_sigint_saves_the_current_step_and_the_stop_message_names_the_signal(
        job, sig, request, tmp_path, capsys, monkeypatch):
    config = job_config(request, job)
    config.checkpoint.every_steps = 100  # the only checkpoint is the one the signal asks for
    add = RunLog.add

    def add_then_signal(self, step, metrics):  # the signal arrives after step 3, in this process
        add(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(RunLog, "add", add_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    capsys.readouterr()
    result = run_job(job, config, tmp_path)
    out = capsys.readouterr().out
    assert f"Stopped by {sig.name} at step 3; checkpoint saved in {tmp_path / 'checkpoints'}." in out
    assert result["preempted"] and result["step"] == 3 and len(result["history"]) == 3
    assert checkpoint_steps(tmp_path) == [3] and not (tmp_path / "FINISHED").exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the run's handlers are gone


@pytest.mark.parametrize("job", TRAINING_JOBS)
def test_a_finished_run_wrote_FINISHED_and_a_rerun_says_so_and_changes_nothing(job, uninterrupted, tmp_path, capsys):
    config, full_dir, full = uninterrupted(job)
    assert full["finished"] and full["step"] == SHORT_STEPS
    assert (full_dir / "FINISHED").read_text() == f"{SHORT_STEPS}\n"
    workdir = tmp_path / "again"
    shutil.copytree(full_dir, workdir)
    before = every_file(workdir)
    capsys.readouterr()
    again = run_job(job, config, workdir)
    assert (f"Run already finished: {workdir} holds step {SHORT_STEPS} of {SHORT_STEPS}. Nothing to do."
            in capsys.readouterr().out)
    assert again["finished"] and again["step"] == again["start_step"] == SHORT_STEPS and "history" not in again
    assert every_file(workdir) == before  # not one file written, changed or removed


def test_a_finished_run_extended_to_more_steps_drops_its_FINISHED_until_it_finishes_again(uninterrupted, tmp_path):
    config, full_dir, _ = uninterrupted("pretrain")
    workdir = tmp_path / "extended"
    shutil.copytree(full_dir, workdir)
    longer = config.copy_and_resolve_references()
    longer.train.num_steps = SHORT_STEPS + 2
    longer.checkpoint.allow_changes = True  # num_steps is a schedule setting
    stopped = run_job("pretrain", longer, workdir, stop_at_step=SHORT_STEPS + 1)
    assert stopped["preempted"] and stopped["start_step"] == SHORT_STEPS
    assert not (workdir / "FINISHED").exists()  # launch/relaunch.sh must relaunch it
    finished = run_job("pretrain", longer, workdir)
    assert finished["finished"] and (workdir / "FINISHED").read_text() == f"{SHORT_STEPS + 2}\n"
