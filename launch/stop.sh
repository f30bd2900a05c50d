#!/usr/bin/env bash
# Stops the training job on every worker of the slice (the slice stays up).
set -euo pipefail

usage() {
  printf '%s\n' "Usage: stop.sh [options]

Stops igpt_jax.main on all workers of TPU_NAME (SIGTERM to the process group in ~/igpt_run.pid, SIGKILL after
60 s). The slice keeps running (and costing): delete it with delete.sh. run.sh with the same workdir resumes
from the latest checkpoint.

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone of the slice (ZONE; required)
  --tpu-name=NAME                  the slice (TPU_NAME; required)
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  parse_args "$@"
  ((${#EXTRA_ARGS[@]} == 0)) || die_usage "stop.sh takes no arguments after --"
  require ZONE TPU_NAME
  stop_job
}

main "$@"
