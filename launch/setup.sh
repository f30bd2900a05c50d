#!/usr/bin/env bash
# Copies this checkout's code to every worker of the slice and installs it with its dependencies.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: setup.sh [options]

Packs the committed code (git archive REF, default HEAD: commit your changes first), copies the tarball to
every worker of TPU_NAME (gcloud compute tpus tpu-vm scp --worker=all), unpacks it into ~/igpt_jax and installs
it there (pip install -U \"jax[tpu]\" and pip install -e .) on all workers at once (tpu-vm ssh --worker=all).
Running it again replaces ~/igpt_jax on every worker (stop a running job first).

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone of the slice (ZONE; required)
  --tpu-name=NAME                  the slice (TPU_NAME; required)
  --ref=REF                        commit, branch or tag to ship (default HEAD)
  --python=PROGRAM                 interpreter on the workers (TPU_PYTHON; default python3)
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text

Example:
  ZONE=us-central2-b TPU_NAME=igpt-xl launch/setup.sh --dry-run"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  SCRIPT_OPTS="ref python"
  parse_args "$@"
  ((${#EXTRA_ARGS[@]} == 0)) || die_usage "setup.sh takes no arguments after --"
  require ZONE TPU_NAME
  setup_workers
}

main "$@"
