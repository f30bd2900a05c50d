#!/usr/bin/env bash
# Deletes the slice: its queued resource and the TPU VMs in it.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: delete.sh [options]

Deletes the queued resource QR_ID together with its node TPU_NAME (gcloud compute tpus queued-resources delete
--force). The workdir in Cloud Storage is kept. gcloud asks for confirmation unless --yes is given.

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone of the slice (ZONE; required)
  --tpu-name=NAME                  the slice (TPU_NAME; required)
  --qr-id=ID                       queued-resource id (QR_ID; default: TPU_NAME-qr)
  --yes                            do not ask (passes --quiet to gcloud)
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  SCRIPT_OPTS="yes"
  parse_args "$@"
  ((${#EXTRA_ARGS[@]} == 0)) || die_usage "delete.sh takes no arguments after --"
  require ZONE TPU_NAME
  if is_true YES; then
    delete_slice --quiet
  else
    delete_slice
  fi
}

main "$@"
