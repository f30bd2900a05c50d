"""Entry point: ``python -m igpt_jax.main --config=configs/igpt_s.py[:variant] --workdir=DIR [--config.a.b=v]``.

`config.job` picks the job. On several hosts (a TPU pod slice) every host runs the same command; the job calls
`jax.distributed.initialize()` first.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Call jax.distributed.initialize(): 'auto' does on Cloud TPU pods and multi-process launches "
    "(JAX_COORDINATOR_ADDRESS / TPU worker environment).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside Cloud TPU (else auto).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show INFO logs of Orbax, Grain and TFDS.")
flags.mark_flags_as_required(["config", "workdir"])

_QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/", "/array_record/")


class _QuietLibraries(std_logging.Filter):
    """Drops INFO (and lower) records from the I/O libraries so that the run's own progress stays readable."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in _QUIET_LIBRARIES)

# config.job -> the module whose run(config, workdir) does it.
JOBS = {
    "pretrain": "igpt_jax.jobs.pretrain",
    "compile": "igpt_jax.jobs.compile",
    "probe": "igpt_jax.jobs.probe",
    "finetune": "igpt_jax.jobs.finetune",
    "sample": "igpt_jax.jobs.sample",
    "evaluate": "igpt_jax.jobs.evaluate",
}


def _multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    hostnames = env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS") or ""
    return "," in hostnames


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # noqa: PLC0415  (after flag parsing, so XLA_FLAGS set by the user apply)

    if not _LIBRARY_LOGS.value:
        logging.get_absl_handler().addFilter(_QuietLibraries())
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value == "yes" or (_DISTRIBUTED.value == "auto" and _multi_host_environment()):
        jax.distributed.initialize()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # progress and results from process 0 only
    config = _CONFIG.value
    logging.info("job %s, workdir %s, %d processes, %d devices (%s)", config.job, _WORKDIR.value,
                 jax.process_count(), jax.device_count(), jax.default_backend())
    result = run_job(config, _WORKDIR.value)
    if isinstance(result, dict) and result.get("preempted"):
        return  # the follow-up jobs run when the re-launched job has finished
    for follow_up in config.then:
        run_job(follow_up_config(config, follow_up, _WORKDIR.value), os.path.join(_WORKDIR.value, follow_up))


def follow_up_config(config, follow_up: str, workdir: str):
    """The config of a `config.then` job: after pretraining it reads the run just trained (its latest step);
    after any other job (e.g. a probe of a converted model) it reads the same source as that job."""
    follow_config = config.copy_and_resolve_references()
    with follow_config.unlocked():
        follow_config.job = follow_up
        follow_config.then = ()
        if config.job == "pretrain":
            follow_config.checkpoint.source_workdir = workdir
            follow_config.checkpoint.step = -1
    return follow_config


def run_job(config, workdir: str):
    """Imports the module of `config.job` and runs it."""
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
    try:
        job = importlib.import_module(JOBS[config.job])
    except ModuleNotFoundError as err:
        if err.name != JOBS[config.job]:
            raise
        raise app.UsageError(f"config.job={config.job!r} is not available in this version") from err
    return job.run(config, workdir)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
