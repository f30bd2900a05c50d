#!/usr/bin/env bash
# Requests a Cloud TPU slice as a queued resource and waits until it is ACTIVE.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: create.sh [options] [-- extra 'gcloud compute tpus queued-resources create' flags]

Requests the slice TPU_NAME (ACCELERATOR_TYPE) as the queued resource QR_ID, then polls it until it is ACTIVE
(or fails if the request FAILED or was SUSPENDED).

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone, e.g. us-central2-b for v4 (ZONE; required)
  --tpu-name=NAME                  node id of the slice (TPU_NAME; required)
  --qr-id=ID                       queued-resource id (QR_ID; default: TPU_NAME-qr)
  --accelerator-type=TYPE          v4-1024, v4-2048, v3-1024, v3-2048, v5p-1024, ... (ACCELERATOR_TYPE;
                                   required)
  --runtime-version=VERSION        TPU VM image (RUNTIME_VERSION; default: tpu-ubuntu2204-base for v2/v3/v4,
                                   v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e)
  --spot                           Spot capacity: cheaper, can be preempted (SPOT=1; --preemptible is an
                                   alias)
  --reserved                       reserved capacity (RESERVED=1)
  --poll-seconds=N                 seconds between state checks (POLL_SECONDS; default 60)
  --wait-timeout=N                 give up waiting after N seconds (WAIT_TIMEOUT; default 0: wait forever)
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text

Example:
  ZONE=us-central2-b TPU_NAME=igpt-xl launch/create.sh --accelerator-type=v4-1024 --spot --dry-run"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  SCRIPT_OPTS="accelerator-type runtime-version spot preemptible reserved poll-seconds wait-timeout"
  parse_args "$@"
  require ZONE TPU_NAME ACCELERATOR_TYPE
  CREATE_FLAGS=("${EXTRA_ARGS[@]}")
  create_slice
  wait_active || die "the slice $TPU_NAME did not become ACTIVE"
}

main "$@"
