"""Entry point: ``python -m igpt_jax.main --config=configs/igpt_s.py[:variant] --workdir=DIR [--config.a.b=v]``.

`config.job` picks the job (pretrain, probe, finetune, sample, evaluate, compile, vqvae, tokenize, lr_search);
`config.then` lists the jobs to run after it, each reading the run before it (see `config_checks.follow_up_jobs`).
``--list`` prints the jobs and every config field with its value and meaning (no --workdir needed). The whole config
(and every follow-up job's) is checked before any job starts: a bad setting is one line naming the field. On several
hosts (a TPU pod slice) every host runs the same command; the job calls `jax.distributed.initialize()` first.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import re
import sys

from igpt_jax import quiet_start

if __name__ == "__main__":
    sys.argv[0] = "igpt_jax.main"  # --help names the module, not this file's path on this machine

quiet_start.skip_absent_tpu()  # before anything starts a JAX backend

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from igpt_jax.config import checks as config_checks  # noqa: E402
from igpt_jax.config import listing as config_listing  # noqa: E402
from igpt_jax.errors import ConfigError, MissingSource, StorageError, WorkdirInUse  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...); not needed with --list.")
_LIST = flags.DEFINE_bool("list", False, "Print the jobs and every config field (value, default, meaning) and exit.")
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
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a storage failure, show the traceback and Orbax's error logs too "
                             "(else one line).")

_QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/", "/array_record/")

# config.job -> the module whose run(config, workdir) does it.
JOBS = {name: module for name, (module, _) in config_checks.JOBS.items()}


class _QuietLibraries(std_logging.Filter):
    """Drops INFO (and lower) records from the I/O libraries so that the run's own progress stays readable."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in _QUIET_LIBRARIES)


class _QuietOrbaxErrors(std_logging.Filter):
    """Drops Orbax's ERROR records (a failed background save logs its traceback three times): the failure itself
    reaches the job and is reported in one line (`StorageError`); ``--verbose`` keeps them."""

    def filter(self, record) -> bool:
        return not (record.levelno >= 40 and "/orbax/" in record.pathname)


def _multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    hostnames = env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS") or ""
    return "," in hostnames


def _fail(message: str, status: int = 2) -> None:
    """Prints one line to stderr and exits with `status` (2: a usage error, before any work; 1: a storage failure)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _innermost_message(err: BaseException, argv: list[str] | None = None) -> str:
    """The most specific line of an exception chain (config files' own errors are wrapped by config_flags)."""
    chain = []
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    for e in chain:  # ml_collections' "Did you mean" for a misspelt field
        match = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(e))
        if match:
            flag = next((a.split("=")[0] for a in argv or () if re.match(rf"--config\.\S*\b{match[2]}(\.|=|$)", a)),
                        match[2])
            return f"{flag}: no such config field (did you mean {match[1]!r}?); list them with --list"
    first_line = str(chain[0]).splitlines()[0] if str(chain[0]) else ""
    if (isinstance(chain[0], flags.Error) and first_line.startswith("flag --config.")
            and "Error whilst parsing config file" not in first_line):
        return first_line  # a mistyped value: "flag --config.train.batch_size=abc: invalid literal ..."
    last = chain[-1]
    lines = [line.strip() for line in str(last).splitlines() if line.strip()]
    if isinstance(last, OSError) and "Failed loading config file" in str(last):
        return f"cannot load the config file: {lines[-1]}"
    return lines[-1] if lines else type(last).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors (bad variant, misspelt or mistyped field) as one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
        _fail(_innermost_message(err, argv))
        raise  # unreachable


def _load_config():
    """The config with command-line overrides, settings that follow the data resolved, and checked (no devices)."""
    if flags.FLAGS["config"].present == 0 and _CONFIG.value is None:
        _fail("--config=FILE[:variant] is required (e.g. --config=configs/demo.py)")
    try:
        config = _CONFIG.value
        config.job  # noqa: B018  (a config file that failed to load raises here)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as err:
        _fail(_innermost_message(err))
    try:
        config_checks.resolve(config)
        config_checks.validate(config)
        if not _LIST.value:
            config_checks.check_data_available(config)
    except ConfigError as err:
        _fail(str(err))
    return config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]} (settings are --config.SECTION.FIELD=VALUE)")
    config = _load_config()
    if _LIST.value:
        print(config_listing.listing(config, config_name=flags.FLAGS["config"].config_filename), end="")
        return
    if not _WORKDIR.value:
        _fail("--workdir=DIR is required (the run directory, local or gs://)")
    workdir = _WORKDIR.value
    follow_ups = config_checks.follow_up_jobs(config, workdir)
    for follow_config, _ in follow_ups:
        try:
            config_checks.validate(follow_config)
        except ConfigError as err:
            _fail(f"follow-up job {follow_config.job!r} (config.then): {err}")

    if not _LIBRARY_LOGS.value:
        logging.get_absl_handler().addFilter(_QuietLibraries())
    if not _VERBOSE.value:
        logging.get_absl_handler().addFilter(_QuietOrbaxErrors())
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value == "yes" or (_DISTRIBUTED.value == "auto" and _multi_host_environment()):
        jax.distributed.initialize()
    if config.job != "compile":  # the compile job's mesh covers a described slice, not these devices
        try:
            for c in [config] + [c for c, _ in follow_ups]:
                config_checks.validate(c, num_devices=jax.device_count())
        except ConfigError as err:
            _fail(str(err))
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # progress and results from process 0 only
    if config.then and not follow_ups:
        logging.info("config.then=%s does not apply to job %s (see config_checks.follow_up_jobs)", tuple(config.then),
                     config.job)
    logging.info("job %s, workdir %s, %d processes, %d devices (%s)", config.job, workdir,
                 jax.process_count(), jax.device_count(), jax.default_backend())
    result = run_job(config, workdir)
    if isinstance(result, dict) and result.get("preempted"):
        return  # the follow-up jobs run when the re-launched job has finished
    for follow_config, follow_workdir in follow_ups:
        run_job(follow_config, follow_workdir)


def run_job(config, workdir: str):
    """Imports the module of `config.job` and runs it; a bad-input error it raises (`ConfigError`: a resume that
    would change the architecture, a checkpoint that disagrees with the config; `MissingSource`: no checkpoint or
    converted model where the job reads one; `WorkdirInUse`: another run holds the workdir) ends the command in one
    line with status 2; a `StorageError` (a failed write) in one line with status 1 (``--verbose``: its traceback)."""
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
    try:
        job = importlib.import_module(JOBS[config.job])
    except ModuleNotFoundError as err:
        if err.name != JOBS[config.job]:
            raise
        raise app.UsageError(f"config.job={config.job!r} is not available in this version") from err
    try:
        return job.run(config, workdir)
    except (ConfigError, MissingSource, WorkdirInUse) as err:
        _fail(str(err))
    except StorageError as err:
        if _VERBOSE.value:
            raise
        _fail(str(err), status=1)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
