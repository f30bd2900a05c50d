#!/usr/bin/env bash
# Shows (and follows) the job's log on one worker of the slice.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: logs.sh [options]

Runs tail -n LINES -F ~/igpt_run.log on worker 0 (or --worker=N) of TPU_NAME. Worker 0 logs the progress and
the results; the other workers log warnings and errors only.

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone of the slice (ZONE; required)
  --tpu-name=NAME                  the slice (TPU_NAME; required)
  --worker=N                       worker number, or all (default 0)
  --lines=N                        lines of history to show (default 200)
  --no-follow                      print and exit instead of following the log
  --dry-run                        print every command instead of running it (DRY_RUN=1)
  -h, --help                       this text

Example:
  ZONE=us-central2-b TPU_NAME=igpt-xl launch/logs.sh --worker=3 --dry-run"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

main() {
  SCRIPT_OPTS="worker lines no-follow"
  parse_args "$@"
  ((${#EXTRA_ARGS[@]} == 0)) || die_usage "logs.sh takes no arguments after --"
  require ZONE TPU_NAME
  local follow=''
  if is_true FOLLOW; then follow=' -F'; fi
  tpu_ssh "$WORKER" "tail -n $LOG_LINES$follow ~/$REMOTE_LOG"
}

main "$@"
