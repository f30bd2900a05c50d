#!/usr/bin/env bash
# Keeps a training run going on a (Spot) slice: creates the slice, sets it up and starts the job, and after a
# preemption or a crash does it again, until the run writes WORKDIR/FINISHED.
set -euo pipefail

usage() {
  printf '%s\n' "Usage: relaunch.sh --workdir=gs://BUCKET/RUN [options] [-- --config.train.lr=3e-3 ...]

Babysits one run. Every POLL_SECONDS it checks, in this order:
  1. WORKDIR/FINISHED exists (pretrain, finetune and vqvae write it when they end)  -> done, exit 0
     (with --delete-when-done the slice is deleted first);
  2. the queued resource QR_ID:
     missing, SUSPENDED (preempted) or FAILED -> delete it, create it again, wait until ACTIVE, set up the
                                                  workers (setup.sh) and start the job (run.sh);
     WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, ... -> wait;
  3. when ACTIVE, the node TPU_NAME: PREEMPTED, TERMINATED or missing -> as for SUSPENDED above;
  4. when READY, the job on every worker: code missing -> set up and start; never started -> start;
     died on some worker (crashed) -> stop it everywhere and start it again, at most MAX_RESTARTS times.
The job resumes from the latest checkpoint in WORKDIR each time. Run the babysitter somewhere that stays up
(a small VM, tmux, nohup): it holds no state of its own and can be stopped and started again at any time.
Stop the babysitter before stopping the job by hand (stop.sh), or it starts the job again.

Options (in parentheses: the environment variable that sets it too):
  --project=PROJECT                Google Cloud project (PROJECT; default: gcloud's core/project)
  --zone=ZONE                      zone (ZONE; required)
  --tpu-name=NAME                  node id of the slice (TPU_NAME; required)
  --qr-id=ID                       queued-resource id (QR_ID; default: TPU_NAME-qr)
  --accelerator-type=TYPE          e.g. v4-1024 (ACCELERATOR_TYPE; required)
  --runtime-version=VERSION        TPU VM image (RUNTIME_VERSION; default from the accelerator type, see
                                   create.sh --help)
  --spot                           request Spot capacity (SPOT=1; --preemptible is an alias)
  --reserved                       request reserved capacity (RESERVED=1)
  --workdir=gs://BUCKET/RUN        run directory (WORKDIR; required; gs:// on multi-host slices)
  --config=FILE[:VARIANT]          config file relative to the repository (IGPT_CONFIG; default
                                   configs/igpt_xl.py)
  --python=PROGRAM                 interpreter on the workers (TPU_PYTHON; default python3)
  --ref=REF                        commit to ship to new workers (default HEAD)
  --poll-seconds=N                 seconds between checks (POLL_SECONDS; default 300, 60 while creating)
  --wait-timeout=N                 give up waiting for ACTIVE after N seconds and retry (WAIT_TIMEOUT;
                                   default 0: never)
  --max-restarts=N                 crash restarts on one slice before giving up (MAX_RESTARTS; default 3)
  --delete-when-done               delete the slice once the run is finished
  --once                           one check (and what it calls for), then exit
  --dry-run                        print the commands of one pass instead of running them (DRY_RUN=1); the
                                   probes are answered by FAKE_QR_STATE (default ACTIVE), FAKE_NODE_STATE
                                   (READY), FAKE_JOB_STATE (running, idle, stopped, missing) and
                                   FAKE_FINISHED (0)
  -h, --help                       this text

Example (the commands after a preemption):
  ZONE=us-central2-b TPU_NAME=igpt-xl ACCELERATOR_TYPE=v4-1024 FAKE_QR_STATE=SUSPENDED \\
    launch/relaunch.sh --spot --workdir=gs://my-bucket/igpt-xl --dry-run -- --config.train.lr=3e-3"
}

here=${BASH_SOURCE[0]%/*}; [[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

RESTARTS=0
RECREATES=0

# The functions below run where bash's errexit is off (they are called in conditions), so every step that
# can fail is checked: a failed step is reported and tried again at the next check.

# recreate: a fresh slice with the code installed and the job started. Returns 1 if a step failed.
recreate() {
  RECREATES=$((RECREATES + 1))
  RESTARTS=0
  if [[ $STATE != NOT_FOUND ]]; then
    info "deleting queued resource $QR_ID ($STATE)"
    delete_slice --quiet || { warn "could not delete $QR_ID"; return 1; }
  fi
  create_slice || { warn "could not create $QR_ID"; return 1; }
  # While waiting for capacity, poll more often than while babysitting.
  POLL_SECONDS=$CREATE_POLL_SECONDS wait_active || { warn "$QR_ID did not become ACTIVE"; return 1; }
  setup_workers || { warn "setting up the workers failed"; return 1; }
  start_job || { warn "starting the job failed"; return 1; }
  is_dry_run || info "job started on a new slice (slice number $RECREATES of this babysitter)"
}

restart_job() {
  if run_finished; then
    return 0
  fi
  if ((RESTARTS >= MAX_RESTARTS)); then
    die "the job stopped again after $RESTARTS restarts on this slice; see launch/logs.sh (MAX_RESTARTS=$MAX_RESTARTS)"
  fi
  RESTARTS=$((RESTARTS + 1))
  warn "the job is not running on every worker: restart $RESTARTS of $MAX_RESTARTS on this slice"
  stop_job || { warn "stopping the job failed"; return 1; }
  start_job || { warn "starting the job failed"; return 1; }
}

# check_once: one pass of the babysitter. Returns 0 when the run is finished, 1 when it is not.
check_once() {
  if run_finished; then
    info "found ${WORKDIR%/}/FINISHED: the run is complete"
    if is_true DELETE_WHEN_DONE; then
      delete_slice --quiet
    fi
    return 0
  fi
  qr_state FAKE_QR_STATE ACTIVE
  case $STATE in
    ACTIVE)
      node_state
      case $NODE_STATE in
        READY)
          job_state
          case $JOB_STATE in
            running) info "the job is running on $TPU_NAME" ;;
            missing)
              info "the code is not installed on every worker: setting up"
              if ! { setup_workers && start_job; }; then
                warn "set-up or start failed; trying again at the next check"
              fi ;;
            idle)
              info "the job is not started: starting it"
              start_job || warn "start failed; trying again at the next check" ;;
            stopped) restart_job || warn "restart failed; trying again at the next check" ;;
            *) warn "job state unknown; checking again later" ;;
          esac ;;
        PREEMPTED | TERMINATED | NOT_FOUND)
          info "node $TPU_NAME is $NODE_STATE: re-creating the slice"
          recreate || warn "re-creating the slice failed; trying again at the next check" ;;
        *) info "node $TPU_NAME is $NODE_STATE; waiting" ;;
      esac ;;
    SUSPENDED | FAILED | NOT_FOUND)
      info "queued resource $QR_ID is $STATE: (re-)creating the slice"
      recreate || warn "re-creating the slice failed; trying again at the next check" ;;
    UNKNOWN) warn "could not read the state of $QR_ID; checking again later" ;;
    *) info "queued resource $QR_ID is $STATE; waiting" ;;
  esac
  return 1
}

main() {
  SCRIPT_OPTS="accelerator-type runtime-version spot preemptible reserved workdir config python ref poll-seconds"
  SCRIPT_OPTS+=" wait-timeout max-restarts delete-when-done once"
  parse_args "$@"
  require ZONE TPU_NAME ACCELERATOR_TYPE WORKDIR
  check_workdir
  check_config
  CREATE_POLL_SECONDS=${POLL_SECONDS:-60}
  POLL_SECONDS=${POLL_SECONDS:-300}
  info "babysitting $WORKDIR on $ACCELERATOR_TYPE slice $TPU_NAME ($NUM_HOSTS hosts)"
  while :; do
    if check_once; then
      return 0
    fi
    if is_dry_run; then
      info "dry run: one pass only; a real run checks again every ${POLL_SECONDS}s"
      return 0
    fi
    if is_true ONCE; then
      return 0
    fi
    sleep "$POLL_SECONDS"
  done
}

main "$@"
