# shellcheck shell=bash
# Shared settings and helpers of the igpt_jax Cloud TPU launch scripts. Sourced by them, never run.
#
# The main settings are read from the environment, and a command-line flag overrides them:
#
#   PROJECT           --project            Google Cloud project (default: gcloud's core/project)
#   ZONE              --zone               zone of the slice, e.g. us-central2-b (required)
#   TPU_NAME          --tpu-name           name of the TPU VM slice (node id) (required)
#   QR_ID             --qr-id              queued-resource id (default: TPU_NAME-qr)
#   ACCELERATOR_TYPE  --accelerator-type   e.g. v4-1024, v3-2048, v5p-1024
#   RUNTIME_VERSION   --runtime-version    TPU VM image (default from the accelerator type:
#                                          tpu-ubuntu2204-base for v2/v3/v4, v2-alpha-tpuv5 for v5p,
#                                          v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e)
#   SPOT=1            --spot               Spot capacity (can be preempted; --preemptible is an alias)
#   RESERVED=1        --reserved           reserved capacity
#   WORKDIR           --workdir            run directory, gs://BUCKET/RUN on a multi-host slice
#   IGPT_CONFIG       --config             config file, relative to the repo (default configs/igpt_xl.py)
#   TPU_PYTHON        --python             interpreter on the workers (default python3)
#   DRY_RUN=1         --dry-run            print every command ("+ cmd", one per line) instead of running it
#   POLL_SECONDS, WAIT_TIMEOUT, MAX_RESTARTS, GCLOUD (the gcloud program): see the scripts' --help.
#
# A dry run runs nothing: no gcloud, no git, no ssh. State probes (queued-resource state, node state, job
# state, the FINISHED marker) are printed and answered by FAKE_QR_STATE, FAKE_WAIT_STATE (the polls while
# waiting for ACTIVE), FAKE_NODE_STATE, FAKE_JOB_STATE and FAKE_FINISHED, which are refused outside a dry run.

if [[ -n ${_IGPT_LAUNCH_COMMON_LOADED:-} ]]; then
  return 0
fi
_IGPT_LAUNCH_COMMON_LOADED=1

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  printf '%s: error: needs bash >= 4.4 (this is %s; on macOS: brew install bash)\n' "${0##*/}" "$BASH_VERSION" >&2
  exit 2
fi

_common_src=${BASH_SOURCE[0]}
[[ $_common_src == */* ]] || _common_src=./$_common_src
LAUNCH_DIR=$(cd "${_common_src%/*}" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
SCRIPT_NAME=${0##*/}
unset _common_src

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
QR_ID=${QR_ID:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
DRY_RUN=${DRY_RUN:-0}
WORKDIR=${WORKDIR:-}
CONFIG=${IGPT_CONFIG:-configs/igpt_xl.py}
PYTHON=${TPU_PYTHON:-python3}
POLL_SECONDS=${POLL_SECONDS:-}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-3}
# Flags only (common words, not read from the environment).
WORKER=0
GIT_REF=HEAD
LOG_LINES=200
FOLLOW=1
RESTART=0
YES=0
ONCE=0
DELETE_WHEN_DONE=0
GCLOUD=${GCLOUD:-gcloud}
# On every worker, relative to the home directory: the code, its tarball, the job's log and pid file.
REMOTE_DIR=igpt_jax
REMOTE_TARBALL=igpt_jax.tar.gz
REMOTE_LOG=igpt_run.log
REMOTE_PID=igpt_run.pid

EXTRA_ARGS=()   # everything after "--"
LOC_FLAGS=()    # --project=... --zone=...
NUM_HOSTS=0

# ---------------------------------------------------------------------------------------------- output

info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2; }
# die MESSAGE: a runtime error (exit 1).
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}
# die_usage MESSAGE: a usage or settings error (exit 2).
die_usage() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$SCRIPT_NAME" >&2
  exit 2
}

is_true() {
  case ${!1:-} in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    '' | 0 | false | FALSE | False | no | NO | off) return 1 ;;
    *) die_usage "$1=${!1} is not a boolean (use 1 or 0)" ;;
  esac
}

is_dry_run() { is_true DRY_RUN; }

# shell_quote WORD: sets REPLY to WORD quoted for a POSIX shell, left bare when it is safe (like Python's
# shlex.quote, so that a printed line splits back into the exact argv).
shell_quote() {
  local s=$1 sq="'" rep="'\"'\"'"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    REPLY=$s
  else
    REPLY="'${s//"$sq"/"$rep"}'"
  fi
}

# join_quoted ARGS...: sets REPLY to the ARGS quoted and joined by spaces.
join_quoted() {
  local out='' a
  for a in "$@"; do
    shell_quote "$a"
    out+=${out:+ }$REPLY
  done
  REPLY=$out
}

# print_cmd ARGS...: prints "+ ARGS" (quoted) on one line: to stdout in a dry run, else to stderr.
print_cmd() {
  join_quoted "$@"
  if is_dry_run; then
    printf '+ %s\n' "$REPLY"
  else
    printf '+ %s\n' "$REPLY" >&2
  fi
}

# run CMD ARGS...: every external command that changes something goes through here.
run() {
  print_cmd "$@"
  if is_dry_run; then
    return 0
  fi
  "$@"
}

# probe FAKE_VAR DRY_ANSWER CMD ARGS...: a read-only query. Sets PROBE_OUT, PROBE_ERR and PROBE_RC. In a dry
# run it only prints the command and answers ${FAKE_VAR:-DRY_ANSWER}.
probe() {
  local fake_var=$1 dry_answer=$2 errfile
  shift 2
  print_cmd "$@"
  PROBE_RC=0
  PROBE_ERR=''
  if is_dry_run; then
    PROBE_OUT=${!fake_var:-$dry_answer}
    return 0
  fi
  errfile=$(mktemp)
  PROBE_OUT=$("$@" 2>"$errfile") || PROBE_RC=$?
  PROBE_ERR=$(<"$errfile")
  rm -f "$errfile"
}

# ---------------------------------------------------------------------------------------------- options

# Options every script takes; each script adds its own in SCRIPT_OPTS before calling parse_args.
COMMON_OPTS="help dry-run project zone tpu-name qr-id"
SCRIPT_OPTS=${SCRIPT_OPTS:-}
FLAG_OPTS=" help dry-run spot preemptible reserved restart yes once no-follow delete-when-done "

parse_args() {
  local arg name val has_val
  while (($#)); do
    arg=$1
    case $arg in
      -h) arg=--help ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      --*) ;;
      *) die_usage "unexpected argument '$arg' (extra arguments go after --)" ;;
    esac
    if [[ $arg == *=* ]]; then
      name=${arg%%=*}; name=${name#--}; val=${arg#*=}; has_val=1
    else
      name=${arg#--}; val=''; has_val=0
    fi
    if [[ " $COMMON_OPTS $SCRIPT_OPTS " != *" $name "* ]]; then
      die_usage "unknown option --$name"
    fi
    if [[ $FLAG_OPTS == *" $name "* ]]; then
      ((has_val == 0)) || die_usage "--$name takes no value"
    elif ((has_val == 0)); then
      (($# >= 2)) || die_usage "--$name needs a value"
      val=$2
      shift
    fi
    # shellcheck disable=SC2034  # some of these are read by the scripts only
    case $name in
      help) usage; exit 0 ;;
      dry-run) DRY_RUN=1 ;;
      project) PROJECT=$val ;;
      zone) ZONE=$val ;;
      tpu-name) TPU_NAME=$val ;;
      qr-id) QR_ID=$val ;;
      accelerator-type) ACCELERATOR_TYPE=$val ;;
      runtime-version) RUNTIME_VERSION=$val ;;
      spot | preemptible) SPOT=1 ;;
      reserved) RESERVED=1 ;;
      workdir) WORKDIR=$val ;;
      config) CONFIG=$val ;;
      python) PYTHON=$val ;;
      worker) WORKER=$val ;;
      ref) GIT_REF=$val ;;
      lines) LOG_LINES=$val ;;
      no-follow) FOLLOW=0 ;;
      restart) RESTART=1 ;;
      yes) YES=1 ;;
      once) ONCE=1 ;;
      delete-when-done) DELETE_WHEN_DONE=1 ;;
      poll-seconds) POLL_SECONDS=$val ;;
      wait-timeout) WAIT_TIMEOUT=$val ;;
      max-restarts) MAX_RESTARTS=$val ;;
      *) die_usage "option --$name is not handled (bug)" ;;
    esac
    shift
  done
  _finalize_settings
}

_require_uint() {
  [[ ${!1} =~ ^[0-9]+$ ]] || die_usage "$1=${!1} is not a whole number"
}

_finalize_settings() {
  local v
  is_dry_run || true  # validates DRY_RUN
  for v in FAKE_QR_STATE FAKE_WAIT_STATE FAKE_NODE_STATE FAKE_JOB_STATE FAKE_FINISHED; do
    if [[ -n ${!v:-} ]] && ! is_dry_run; then
      die_usage "$v is only for dry runs (set DRY_RUN=1 or pass --dry-run)"
    fi
  done
  is_true SPOT && is_true RESERVED && die_usage "--spot and --reserved are different capacity tiers: pick one"
  is_true FOLLOW || true
  _require_uint LOG_LINES
  _require_uint WAIT_TIMEOUT
  _require_uint MAX_RESTARTS
  [[ -z $POLL_SECONDS ]] || _require_uint POLL_SECONDS
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker number or 'all', not '$WORKER'"
  QR_ID=${QR_ID:-${TPU_NAME:+$TPU_NAME-qr}}
  if [[ -n $ACCELERATOR_TYPE ]]; then
    NUM_HOSTS=$(num_hosts "$ACCELERATOR_TYPE") || exit 2
    RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
  fi
  LOC_FLAGS=()
  [[ -z $PROJECT ]] || LOC_FLAGS+=("--project=$PROJECT")
  [[ -z $ZONE ]] || LOC_FLAGS+=("--zone=$ZONE")
  if ! is_dry_run && ! command -v "$GCLOUD" >/dev/null 2>&1; then
    die "'$GCLOUD' not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)," \
      "or try --dry-run"
  fi
}

# require VAR...: fails with one clear message that names every missing setting.
require() {
  local v missing=()
  for v in "$@"; do
    if [[ -z ${!v:-} ]]; then
      local flag=${v,,}
      missing+=("$v (--${flag//_/-}=... or $v=...)")
    fi
  done
  if ((${#missing[@]})); then
    local msg=${missing[0]} m
    for m in "${missing[@]:1}"; do msg+="; $m"; done
    die_usage "missing required setting(s): $msg"
  fi
}

# ---------------------------------------------------------------------------------------------- TPU types

# num_hosts TYPE: the number of TPU VM hosts (workers) of an accelerator type. v2, v3, v4 and v5p count
# TensorCores, 2 per chip and 4 chips (8 cores) per host: v4-1024 = 512 chips = 128 hosts. v5e and v6e count
# chips: 8 on a single host, else 4 per host.
num_hosts() {
  local t=$1 gen n
  if [[ ! $t =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]]; then
    printf '%s: error: accelerator type %s is not of the form vN-COUNT (e.g. v4-1024)\n' "$SCRIPT_NAME" "$t" >&2
    return 2
  fi
  gen=${BASH_REMATCH[1]}
  n=$((10#${BASH_REMATCH[2]}))
  case $gen in
    v2 | v3 | v4 | v5p)
      if ((n < 8 || n % 8)); then
        printf '%s: error: %s: a %s slice has a multiple of 8 TensorCores\n' "$SCRIPT_NAME" "$t" "$gen" >&2
        return 2
      fi
      echo $((n / 8)) ;;
    v5litepod | v5e | v6e)
      if ((n <= 8)); then echo 1; else echo $(((n + 3) / 4)); fi ;;
    *)
      printf '%s: error: unknown TPU generation in %s (known: v2, v3, v4, v5p, v5litepod, v6e)\n' \
        "$SCRIPT_NAME" "$t" >&2
      return 2 ;;
  esac
}

default_runtime_version() {
  case ${1%-*} in
    v5p) echo v2-alpha-tpuv5 ;;
    v5litepod | v5e) echo v2-alpha-tpuv5-lite ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# ---------------------------------------------------------------------------------------------- slice

create_slice() {
  local cmd=("$GCLOUD" compute tpus queued-resources create "$QR_ID" "--node-id=$TPU_NAME" "${LOC_FLAGS[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
  if is_true SPOT; then cmd+=(--spot); fi
  if is_true RESERVED; then cmd+=(--reserved); fi
  cmd+=("${CREATE_FLAGS[@]}")
  info "requesting $ACCELERATOR_TYPE ($NUM_HOSTS hosts) as queued resource $QR_ID, node $TPU_NAME"
  run "${cmd[@]}"
}
CREATE_FLAGS=()

# delete_slice [--quiet]: deletes the queued resource and its node.
delete_slice() {
  run "$GCLOUD" compute tpus queued-resources delete "$QR_ID" "${LOC_FLAGS[@]}" --force "$@"
}

_not_found() { [[ $PROBE_ERR == *NOT_FOUND* || $PROBE_ERR == *"not found"* || $PROBE_ERR == *"was not found"* ]]; }

# qr_state FAKE_VAR DRY_ANSWER: sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES,
# PROVISIONING, SUSPENDING, SUSPENDED, FAILED, ...), NOT_FOUND, or UNKNOWN when gcloud failed otherwise.
qr_state() {
  probe "$1" "$2" "$GCLOUD" compute tpus queued-resources describe "$QR_ID" "${LOC_FLAGS[@]}" \
    '--format=value(state.state)'
  if is_dry_run || ((PROBE_RC == 0)); then
    STATE=${PROBE_OUT:-UNKNOWN}
  elif _not_found; then
    STATE=NOT_FOUND
  else
    STATE=UNKNOWN
    warn "could not read the state of $QR_ID: ${PROBE_ERR:-gcloud exit code $PROBE_RC}"
  fi
  STATE=${STATE//[[:space:]]/}
}

# node_state: sets NODE_STATE to the TPU node's state (READY, PREEMPTED, TERMINATED, ...), NOT_FOUND or UNKNOWN.
node_state() {
  probe FAKE_NODE_STATE READY "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${LOC_FLAGS[@]}" \
    '--format=value(state)'
  if is_dry_run || ((PROBE_RC == 0)); then
    NODE_STATE=${PROBE_OUT:-UNKNOWN}
  elif _not_found; then
    NODE_STATE=NOT_FOUND
  else
    NODE_STATE=UNKNOWN
    warn "could not read the state of node $TPU_NAME: ${PROBE_ERR:-gcloud exit code $PROBE_RC}"
  fi
  NODE_STATE=${NODE_STATE//[[:space:]]/}
}

# wait_active: polls the queued resource until ACTIVE. Returns 1 if it FAILED or was SUSPENDED, or after
# WAIT_TIMEOUT seconds (0: no limit). A dry run prints the poll once and assumes ACTIVE.
wait_active() {
  local start=$SECONDS poll=${POLL_SECONDS:-60}
  while :; do
    qr_state FAKE_WAIT_STATE ACTIVE
    case $STATE in
      ACTIVE)
        if is_dry_run; then
          info "dry run: taking $QR_ID as ACTIVE (a real run polls every ${poll}s until it is)"
        else
          info "queued resource $QR_ID is ACTIVE"
        fi
        return 0 ;;
      FAILED | SUSPENDING | SUSPENDED)
        warn "queued resource $QR_ID is $STATE; see:" \
          "$GCLOUD compute tpus queued-resources describe $QR_ID ${LOC_FLAGS[*]}"
        return 1 ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      warn "queued resource $QR_ID still $STATE after ${WAIT_TIMEOUT}s"
      return 1
    fi
    info "queued resource $QR_ID is $STATE; next check in ${poll}s"
    sleep "$poll"
  done
}

# ---------------------------------------------------------------------------------------------- workers

tpu_ssh() {  # tpu_ssh WORKER COMMAND
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "--worker=$1" "${LOC_FLAGS[@]}" "--command=$2"
}

# Shell fragments for the workers ("~" and "$" are theirs). The job's pid is also its process group (setsid).
# shellcheck disable=SC2088
R_DIR="~/$REMOTE_DIR"
# shellcheck disable=SC2088
R_PID="~/$REMOTE_PID"
R_ALIVE="[ -f $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null"

# setup_workers: ships GIT_REF of this checkout (git archive) to every worker and installs it there.
setup_workers() {
  local tarball=${TMPDIR:-/tmp}/igpt_jax-$TPU_NAME.tar.gz py
  shell_quote "$PYTHON"; py=$REPLY
  if ! is_dry_run && [[ $GIT_REF == HEAD ]] \
    && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    warn "uncommitted changes in $REPO_ROOT are not shipped: setup copies the last commit (git archive HEAD)"
  fi
  # Explicit returns: relaunch.sh calls this where errexit is off.
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$GIT_REF" || return 1
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all "${LOC_FLAGS[@]}" \
    || return 1
  local remote_cmd="rm -rf $R_DIR && mkdir -p $R_DIR && tar -xzf ~/$REMOTE_TARBALL -C $R_DIR && cd $R_DIR"
  remote_cmd+=" && $py -m pip install -U pip && $py -m pip install -U \"jax[tpu]\" && $py -m pip install -e ."
  tpu_ssh all "$remote_cmd"
}

# The job command every worker runs, quoted for the remote shell.
job_command() {
  local cmd=("$PYTHON" -m igpt_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
  # main.py's --distributed=auto looks for environment variables that Cloud TPU VMs do not set (JAX finds
  # the slice's hosts through the metadata server), so say it on multi-host slices.
  if ((NUM_HOSTS > 1)); then cmd+=(--distributed=yes); fi
  cmd+=("${EXTRA_ARGS[@]}")
  join_quoted "${cmd[@]}"
}

# check_workdir: a multi-host slice needs a workdir that every host reads and writes: gs://.
check_workdir() {
  require WORKDIR
  [[ $WORKDIR == gs://?* ]] && return 0
  if [[ -z $ACCELERATOR_TYPE ]]; then
    die_usage "--workdir=$WORKDIR is not a gs:// path; without --accelerator-type the slice is taken to have" \
      "several hosts, which all need the same gs://BUCKET/RUN workdir"
  fi
  if ((NUM_HOSTS > 1)); then
    die_usage "--workdir=$WORKDIR is a local path, but $ACCELERATOR_TYPE has $NUM_HOSTS hosts: every host must" \
      "read and write the same checkpoints, so use --workdir=gs://BUCKET/RUN"
  fi
}

# check_config: the config must be relative to the repository. A config with a PODS table (igpt_l.py,
# igpt_xl.py: mesh and rules per slice, proven to fit by the compile job) gets the slice's layout:
# `:pod=ACCELERATOR_TYPE` is added to its variant unless --config already names a pod.
check_config() {
  local path=${CONFIG%%:*} variant="" file line in_pods=0 pods=()
  if [[ $path == /* ]]; then
    die_usage "--config=$CONFIG must be relative to the repository root (the workers run from $R_DIR)"
  fi
  file=$REPO_ROOT/$path
  if [[ ! -f $file ]]; then
    warn "$path is not in this checkout ($REPO_ROOT); the workers run $R_DIR/$path"
    return 0
  fi
  [[ $CONFIG == *:* ]] && variant=${CONFIG#*:}
  while IFS= read -r line; do  # the keys of the file's `PODS = {...}` table (pure bash: no grep/sed needed)
    if [[ $line == "PODS = {"* ]]; then in_pods=1; continue; fi
    ((in_pods)) || continue
    [[ $line == "}"* ]] && break
    if [[ $line =~ ^[[:space:]]*\"([^\"]+)\": ]]; then pods+=("${BASH_REMATCH[1]}"); fi
  done <"$file"
  ((${#pods[@]})) || return 0
  [[ ",$variant," == *",pod="* ]] && return 0
  if [[ -z $ACCELERATOR_TYPE ]]; then
    warn "$path has layouts for the slices ${pods[*]}; without --accelerator-type its default pod is used"
    return 0
  fi
  if [[ " ${pods[*]} " != *" $ACCELERATOR_TYPE "* ]]; then
    die_usage "$path has no layout for $ACCELERATOR_TYPE (its PODS: ${pods[*]}); pass --config=$path:pod=NAME" \
      "(pod=any: fsdp over every device) or add $ACCELERATOR_TYPE to its PODS table and prove it with" \
      "--config.job=compile"
  fi
  CONFIG="$path:${variant:+$variant,}pod=$ACCELERATOR_TYPE"
  info "config $CONFIG (the $ACCELERATOR_TYPE layout of $path)"
}

# start_job: starts the job in the background on every worker at once; its output goes to ~/igpt_run.log.
# Refuses (on that worker) while the job is already running there.
start_job() {
  job_command
  local job=$REPLY remote_cmd
  remote_cmd="cd $R_DIR || exit 1; "
  remote_cmd+="if $R_ALIVE; then echo \"igpt_jax.main is already running on \$(hostname):"
  remote_cmd+=" stop it first (stop.sh or run.sh --restart)\" >&2; exit 1; fi; "
  remote_cmd+="setsid nohup $job >> ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > $R_PID"
  tpu_ssh all "$remote_cmd"
}

# stop_job: stops the job on every worker (SIGTERM to its process group, SIGKILL after 60 s).
stop_job() {
  local remote_cmd="if [ -f $R_PID ]; then pid=\$(cat $R_PID); kill -TERM -- -\$pid 2>/dev/null; "
  remote_cmd+="for _ in \$(seq 300); do kill -0 \$pid 2>/dev/null || break; sleep 0.2; done; "
  remote_cmd+="kill -KILL -- -\$pid 2>/dev/null; rm -f $R_PID; fi; true"
  tpu_ssh all "$remote_cmd"
}

# job_state: sets JOB_STATE from what every worker answers: missing (code not set up on some worker), stopped
# (the job died on some worker, or runs on some workers only), idle (never started, or stopped by stop.sh, on
# every worker), running (on every worker), or unknown (ssh failed).
job_state() {
  local remote_cmd="if [ ! -d $R_DIR ]; then echo missing; elif [ ! -f $R_PID ]; then echo idle; "
  remote_cmd+="elif $R_ALIVE; then echo running; else echo stopped; fi"
  probe FAKE_JOB_STATE running "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${LOC_FLAGS[@]}" \
    "--command=$remote_cmd"
  local out=$'\n'$PROBE_OUT$'\n'
  local -A seen=()
  local w
  for w in missing stopped idle running; do
    [[ $out != *$'\n'$w$'\n'* ]] || seen[$w]=1
  done
  # shellcheck disable=SC2034  # read by relaunch.sh
  if [[ -n ${seen[missing]:-} ]]; then
    JOB_STATE=missing
  elif [[ -n ${seen[stopped]:-} ]] || [[ -n ${seen[idle]:-} && -n ${seen[running]:-} ]]; then
    JOB_STATE=stopped
  elif [[ -n ${seen[idle]:-} ]]; then
    JOB_STATE=idle
  elif [[ -n ${seen[running]:-} ]]; then
    JOB_STATE=running
  else
    JOB_STATE=unknown
    warn "could not read the job state: ${PROBE_ERR:-no answer}"
  fi
}

# run_finished: true when the job has written WORKDIR/FINISHED (every training job does when it ends: igpt_jax.training.loop).
run_finished() {
  probe FAKE_FINISHED 0 "$GCLOUD" storage ls "${WORKDIR%/}/FINISHED"
  if is_dry_run; then
    is_true PROBE_OUT
  else
    ((PROBE_RC == 0))
  fi
}
