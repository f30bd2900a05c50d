#!/usr/bin/env bash
# Starts the training job on every worker of the slice at once.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: run.sh --workdir=gs://BUCKET/RUN [options] [-- --config.train.lr=3e-3 ...]

Runs, on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all), in the background:
  cd ~/igpt_jax && python3 -m igpt_jax.main --config=CONFIG --workdir=WORKDIR [--distributed=yes] [OVERRIDES...]
with its output in ~/igpt_run.log and its pid in ~/igpt_run.pid on each worker. Arguments after -- (such as
--config.train.lr=3e-3) are passed on to igpt_jax.main. --distributed=yes is added on multi-host slices.
A slice with more than one host needs a gs:// workdir. Started again with the same workdir, the job resumes
from its latest checkpoint.

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone of the slice (ZONE; required)
  --tpu-name=NAME                  the slice (TPU_NAME; required)
  --accelerator-type=TYPE          e.g. v4-1024: tells how many hosts the slice has (ACCELERATOR_TYPE;
                                   without it, the workdir must be gs://)
  --workdir=DIR                    run directory, gs://BUCKET/RUN (WORKDIR; required)
  --config=FILE[:VARIANT]          config file relative to the repository (IGPT_CONFIG; default
                                   configs/igpt_xl.py)
  --python=PROGRAM                 interpreter on the workers (TPU_PYTHON; default python3)
  --restart                        stop a job that is already running first (else run.sh refuses)
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text

Example:
  ZONE=us-central2-b TPU_NAME=igpt-xl ACCELERATOR_TYPE=v4-1024 \\
    launch/run.sh --workdir=gs://my-bucket/igpt-xl --dry-run -- --config.train.lr=3e-3"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  SCRIPT_OPTS="accelerator-type workdir config python restart"
  parse_args "$@"
  require ZONE TPU_NAME WORKDIR
  check_workdir
  check_config
  if is_true RESTART; then
    stop_job
  fi
  start_job
  is_dry_run || info "started on all workers; follow worker 0 with: launch/logs.sh --zone=$ZONE --tpu-name=$TPU_NAME"
}

main "$@"
