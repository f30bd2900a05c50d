"""The Cloud TPU launch scripts (launch/*.sh): dry runs for a v4-1024 slice, errors, the shell logic the workers
run, one babysitter pass against a fake gcloud, and shellcheck when it is installed.

Dry runs get an empty PATH: they must not need gcloud, git or any other program.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "relaunch.sh", "delete.sh"]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="the launch scripts need bash")

V4_1024 = {"PROJECT": "my-project", "ZONE": "us-central2-b", "TPU_NAME": "igpt-xl", "ACCELERATOR_TYPE": "v4-1024"}
LOC = ["--project=my-project", "--zone=us-central2-b"]
WORKDIR = "gs://my-bucket/igpt-xl"
TARBALL = "/tmp/igpt_jax-igpt-xl.tar.gz"

GCLOUD_QR = ["gcloud", "compute", "tpus", "queued-resources"]
CREATE = [*GCLOUD_QR, "create", "igpt-xl-qr", "--node-id=igpt-xl", *LOC, "--accelerator-type=v4-1024",
          "--runtime-version=tpu-ubuntu2204-base"]
DESCRIBE = [*GCLOUD_QR, "describe", "igpt-xl-qr", *LOC, "--format=value(state.state)"]
DELETE = [*GCLOUD_QR, "delete", "igpt-xl-qr", *LOC, "--force", "--quiet"]
ARCHIVE = ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"]
SCP = ["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL, "igpt-xl:igpt_jax.tar.gz", "--worker=all", *LOC]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "igpt-xl", "--worker=all", *LOC]
INSTALL = ("--command=rm -rf ~/igpt_jax && mkdir -p ~/igpt_jax && tar -xzf ~/igpt_jax.tar.gz -C ~/igpt_jax"
           " && cd ~/igpt_jax && python3 -m pip install -U pip && python3 -m pip install -U \"jax[tpu]\""
           " && python3 -m pip install -e .")
JOB = ("python3 -m igpt_jax.main --config=configs/igpt_xl.py:pod=v4-1024 --workdir=gs://my-bucket/igpt-xl"
       " --distributed=yes"
       " --config.train.lr=3e-3")


def launch(script: str, *args: str, path: str = "/nonexistent-launch-test-path", timeout: float = 20, **env: str):
    """Runs launch/SCRIPT with only the given environment (and an empty PATH unless `path` is given)."""
    full_env = {"PATH": path, "HOME": "/nonexistent-home", "TMPDIR": "/tmp", **env}
    return subprocess.run([BASH, str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd="/", check=False)


def dry_run(script: str, *args: str, **env: str):
    proc = launch(script, *args, DRY_RUN="1", **{**V4_1024, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


def commands(proc) -> list[list[str]]:
    """The printed commands, split back into argv. A dry run prints nothing else on stdout."""
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote(cmd: list[str]) -> str:
    """The shell command of a `gcloud compute tpus tpu-vm ssh ... --command=CMD` argv."""
    assert cmd[-1].startswith("--command="), cmd
    return cmd[-1][len("--command="):]


def start_command(job: str = JOB) -> str:
    return ("--command=cd ~/igpt_jax || exit 1; if [ -f ~/igpt_run.pid ] && kill -0 \"$(cat ~/igpt_run.pid)\""
            " 2>/dev/null; then echo \"igpt_jax.main is already running on $(hostname): stop it first (stop.sh"
            " or run.sh --restart)\" >&2; exit 1; fi; setsid nohup " + job
            + " >> ~/igpt_run.log 2>&1 < /dev/null & echo $! > ~/igpt_run.pid")


# ------------------------------------------------------------------------------------------------ dry runs


def test_create_spot_v4_1024_prints_create_then_state_poll():
    cmds = commands(dry_run("create.sh", "--spot"))
    assert cmds == [[*CREATE, "--spot"], DESCRIBE]


def test_create_on_demand_has_no_spot_and_passes_extra_gcloud_flags():
    cmds = commands(dry_run("create.sh", "--", "--internal-ips"))
    assert cmds == [[*CREATE, "--internal-ips"], DESCRIBE]
    assert commands(dry_run("create.sh", SPOT="1"))[0] == [*CREATE, "--spot"]


def test_create_runtime_version_follows_accelerator_type():
    (create, _) = commands(dry_run("create.sh", ACCELERATOR_TYPE="v5p-1024"))
    assert "--accelerator-type=v5p-1024" in create and "--runtime-version=v2-alpha-tpuv5" in create
    (create, _) = commands(dry_run("create.sh", "--runtime-version=my-image"))
    assert "--runtime-version=my-image" in create


def test_setup_archives_copies_to_all_workers_and_installs():
    assert commands(dry_run("setup.sh")) == [ARCHIVE, SCP, [*SSH_ALL, INSTALL]]


def test_run_starts_the_same_command_on_all_workers():
    cmds = commands(dry_run("run.sh", f"--workdir={WORKDIR}", "--", "--config.train.lr=3e-3"))
    assert cmds == [[*SSH_ALL, start_command()]]


def test_run_quotes_overrides_for_the_remote_shell():
    (cmd,) = commands(dry_run("run.sh", f"--workdir={WORKDIR}", "--config=configs/igpt_l.py", "--",
                              "--config.data.name=it's here"))
    job = shlex.split(remote(cmd).split("setsid nohup ", 1)[1].split(" >> ", 1)[0])
    assert job == ["python3", "-m", "igpt_jax.main", "--config=configs/igpt_l.py:pod=v4-1024", f"--workdir={WORKDIR}",
                   "--distributed=yes", "--config.data.name=it's here"]


def test_run_restart_stops_first():
    (stop, start) = commands(dry_run("run.sh", f"--workdir={WORKDIR}", "--restart"))
    assert stop[:-1] == SSH_ALL and "kill -TERM -- -$pid" in remote(stop)
    assert start == [*SSH_ALL, start_command(JOB.replace(" --config.train.lr=3e-3", ""))]


def test_run_single_host_takes_a_local_workdir_and_no_distributed_flag():
    (cmd,) = commands(dry_run("run.sh", "--workdir=/tmp/run", "--config=configs/igpt_xl.py:runlocal,pod=any",
                              ACCELERATOR_TYPE="v4-8"))
    assert ("setsid nohup python3 -m igpt_jax.main --config=configs/igpt_xl.py:runlocal,pod=any --workdir=/tmp/run >>"
            in remote(cmd))


@pytest.mark.parametrize("config, accelerator, expected", [
    ("configs/igpt_xl.py", "v3-2048", "configs/igpt_xl.py:pod=v3-2048"),
    ("configs/igpt_l.py:res=48", "v5p-1024", "configs/igpt_l.py:res=48,pod=v5p-1024"),
    ("configs/igpt_l.py:pod=v4-2048,res=48", "v4-1024", "configs/igpt_l.py:pod=v4-2048,res=48"),  # named: kept
    ("configs/igpt_s.py", "v4-1024", "configs/igpt_s.py"),  # no PODS table: as given
])
def test_run_gives_pod_configs_the_layout_of_the_slice(config, accelerator, expected):
    (cmd,) = commands(dry_run("run.sh", f"--workdir={WORKDIR}", f"--config={config}", ACCELERATOR_TYPE=accelerator))
    assert f" -m igpt_jax.main --config={expected} --workdir=" in remote(cmd)


def test_run_refuses_a_slice_the_pod_config_has_no_layout_for():
    proc = launch("run.sh", f"--workdir={WORKDIR}", DRY_RUN="1", **{**V4_1024, "ACCELERATOR_TYPE": "v4-32"})
    assert proc.returncode == 2 and not proc.stdout
    assert ("configs/igpt_xl.py has no layout for v4-32 (its PODS: v3-1024 v3-2048 v4-1024 v4-2048 v5p-1024 v5p-2048 "
            "any); pass --config=configs/igpt_xl.py:pod=NAME") in proc.stderr


def test_logs_tails_worker_0_or_the_given_worker():
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "igpt-xl"]
    assert commands(dry_run("logs.sh")) == [[*ssh, "--worker=0", *LOC, "--command=tail -n 200 -F ~/igpt_run.log"]]
    assert commands(dry_run("logs.sh", "--worker=3", "--lines=50", "--no-follow")) == [
        [*ssh, "--worker=3", *LOC, "--command=tail -n 50 ~/igpt_run.log"]]


def test_stop_and_delete():
    (stop,) = commands(dry_run("stop.sh"))
    assert stop[:-1] == SSH_ALL and "kill -TERM -- -$pid" in remote(stop)
    assert commands(dry_run("delete.sh", "--yes")) == [DELETE]
    assert commands(dry_run("delete.sh")) == [DELETE[:-1]]  # gcloud asks


def test_relaunch_after_preemption_deletes_recreates_sets_up_and_runs():
    proc = dry_run("relaunch.sh", "--spot", f"--workdir={WORKDIR}", "--", "--config.train.lr=3e-3",
                   FAKE_QR_STATE="SUSPENDED")
    assert commands(proc) == [
        ["gcloud", "storage", "ls", f"{WORKDIR}/FINISHED"],
        DESCRIBE,
        DELETE,
        [*CREATE, "--spot"],
        DESCRIBE,
        ARCHIVE,
        SCP,
        [*SSH_ALL, INSTALL],
        [*SSH_ALL, start_command()],
    ]
    assert "SUSPENDED" in proc.stderr


def test_relaunch_first_start_and_preempted_node():
    # No queued resource yet: nothing to delete.
    cmds = commands(dry_run("relaunch.sh", f"--workdir={WORKDIR}", FAKE_QR_STATE="NOT_FOUND"))
    assert DELETE not in cmds and cmds[2] == CREATE and cmds[-1][-1].startswith("--command=cd ~/igpt_jax")
    # The queued resource still ACTIVE but its node preempted.
    cmds = commands(dry_run("relaunch.sh", f"--workdir={WORKDIR}", FAKE_NODE_STATE="PREEMPTED"))
    assert [c[:5] for c in cmds[:4]] == [["gcloud", "storage", "ls", f"{WORKDIR}/FINISHED"], DESCRIBE[:5],
                                         ["gcloud", "compute", "tpus", "tpu-vm", "describe"], DELETE[:5]]
    assert cmds[4] == CREATE


@pytest.mark.parametrize("job_state, expected", [
    ("running", []),
    ("idle", ["start"]),
    ("stopped", ["finished?", "stop", "start"]),
    ("missing", ["archive", "scp", "install", "start"]),
])
def test_relaunch_on_a_live_slice_acts_on_the_job_state(job_state, expected):
    cmds = commands(dry_run("relaunch.sh", f"--workdir={WORKDIR}", FAKE_JOB_STATE=job_state))
    probes, actions = cmds[:4], cmds[4:]
    assert probes[0][:3] == ["gcloud", "storage", "ls"] and probes[1] == DESCRIBE
    assert probes[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert probes[3][:-1] == SSH_ALL and "echo running" in remote(probes[3])

    def kind(cmd):
        if cmd[:3] == ["gcloud", "storage", "ls"]:
            return "finished?"
        if cmd == ARCHIVE:
            return "archive"
        if cmd == SCP:
            return "scp"
        if cmd == [*SSH_ALL, INSTALL]:
            return "install"
        if cmd[:-1] == SSH_ALL and "kill -TERM" in remote(cmd):
            return "stop"
        if cmd[:-1] == SSH_ALL and "setsid nohup python3 -m igpt_jax.main" in remote(cmd):
            return "start"
        raise AssertionError(cmd)

    assert [kind(c) for c in actions] == expected


def test_relaunch_stops_when_the_run_is_finished():
    proc = dry_run("relaunch.sh", f"--workdir={WORKDIR}", "--delete-when-done", FAKE_FINISHED="1")
    assert commands(proc) == [["gcloud", "storage", "ls", f"{WORKDIR}/FINISHED"], DELETE]
    assert "complete" in proc.stderr


def test_dry_run_flag_equals_env_var():
    assert dry_run("create.sh", "--spot").stdout == launch("create.sh", "--spot", "--dry-run", **V4_1024).stdout


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("script", ["run.sh", "relaunch.sh"])
def test_local_workdir_refused_on_a_multi_host_slice(script):
    proc = launch(script, "--workdir=/tmp/run", "--dry-run", **V4_1024)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "v4-1024 has 128 hosts" in proc.stderr and "gs://" in proc.stderr


@pytest.mark.parametrize("accelerator_type, hosts", [("v3-2048", 256), ("v4-2048", 256), ("v5p-1024", 128),
                                                      ("v3-1024", 128)])
def test_host_counts_of_common_pod_slices(accelerator_type, hosts):
    proc = launch("run.sh", "--workdir=/tmp/run", "--dry-run", **{**V4_1024, "ACCELERATOR_TYPE": accelerator_type})
    assert proc.returncode == 2 and f"{accelerator_type} has {hosts} hosts" in proc.stderr


def test_local_workdir_refused_when_the_slice_size_is_unknown():
    env = {k: v for k, v in V4_1024.items() if k != "ACCELERATOR_TYPE"}
    proc = launch("run.sh", "--workdir=/tmp/run", "--dry-run", **env)
    assert proc.returncode == 2 and "gs://" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_tpu_name_and_zone_are_named(script):
    args = ["--dry-run", f"--workdir={WORKDIR}"] if script in ("run.sh", "relaunch.sh") else ["--dry-run"]
    proc = launch(script, *args, PROJECT="my-project", ACCELERATOR_TYPE="v4-1024")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "missing required setting(s): ZONE (--zone=... or ZONE=...); TPU_NAME (--tpu-name=..." in proc.stderr


def test_missing_accelerator_type_and_workdir_are_named():
    env = {k: v for k, v in V4_1024.items() if k != "ACCELERATOR_TYPE"}
    assert "ACCELERATOR_TYPE (--accelerator-type" in launch("create.sh", "--dry-run", **env).stderr
    proc = launch("relaunch.sh", "--dry-run", **env)
    assert "ACCELERATOR_TYPE" in proc.stderr and "WORKDIR (--workdir" in proc.stderr


def test_bad_options_are_refused():
    assert "unknown option --bogus" in launch("create.sh", "--bogus", "--dry-run", **V4_1024).stderr
    assert "unknown option --workdir" in launch("create.sh", "--workdir=gs://b/r", "--dry-run", **V4_1024).stderr
    assert "--zone needs a value" in launch("create.sh", "--dry-run", "--zone").stderr
    assert "pick one" in launch("create.sh", "--spot", "--reserved", "--dry-run", **V4_1024).stderr
    assert "not of the form" in launch("create.sh", "--dry-run", **{**V4_1024, "ACCELERATOR_TYPE": "tpu"}).stderr
    assert "worker number" in launch("logs.sh", "--worker=x", "--dry-run", **V4_1024).stderr


def test_fake_states_only_in_dry_runs_and_gcloud_needed_otherwise():
    proc = launch("relaunch.sh", f"--workdir={WORKDIR}", FAKE_QR_STATE="SUSPENDED", **V4_1024)
    assert proc.returncode == 2 and "only for dry runs" in proc.stderr
    proc = launch("create.sh", **V4_1024)
    assert proc.returncode == 1 and "'gcloud' not found" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = launch(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"Usage: {script}") and "--dry-run" in proc.stdout


# ------------------------------------------------------------------------------------------------ worker side


@pytest.mark.skipif(not all(map(shutil.which, ["setsid", "nohup", "seq", "sleep", "cat"])),
                    reason="needs setsid, nohup, seq, sleep, cat")
def test_worker_commands_start_report_and_stop_the_job(tmp_path):
    """Runs the start, state and stop commands that go to the workers, in a fake home with a fake python3."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "igpt_jax").mkdir(parents=True)
    bin_dir.mkdir()
    fake_python = bin_dir / "python3"
    fake_python.write_text("#!/bin/sh\n"
                           "trap 'echo terminated >> \"$HOME/terminated\"; exit 0' TERM\n"
                           "for a in \"$@\"; do printf 'arg:%s\\n' \"$a\"; done\n"
                           "[ -n \"$FAKE_EXIT\" ] && exit 3\n"
                           "while :; do sleep 0.05; done\n")
    fake_python.chmod(0o755)
    (start,) = commands(dry_run("run.sh", f"--workdir={WORKDIR}", "--", "--config.x=it's $HOME"))
    (stop,) = commands(dry_run("stop.sh"))
    state = commands(dry_run("relaunch.sh", f"--workdir={WORKDIR}"))[-1]
    # One shell for all steps: the job stays its child, so it is reaped once stopped (kill -0 then fails).
    script = ('eval "$STATE"; eval "$START"; sleep 0.2; eval "$STATE"; bash -c "$START"; echo "again: $?"; '
              'eval "$STOP"; eval "$STATE"; FAKE_EXIT=1; export FAKE_EXIT; eval "$START"; sleep 0.2; eval "$STATE"; '
              'rm -rf ~/igpt_jax; eval "$STATE"')
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "START": remote(start), "STOP": remote(stop), "STATE": remote(state)}
    proc = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.split() == ["idle", "running", "again:", "1", "idle", "stopped", "missing"], proc.stderr
    assert "already running" in proc.stderr
    assert (home / "terminated").read_text() == "terminated\n"
    log = [line for line in (home / "igpt_run.log").read_text().splitlines() if line.startswith("arg:")]
    assert log[:8] == ["arg:-m", "arg:igpt_jax.main", "arg:--config=configs/igpt_xl.py:pod=v4-1024",
                       f"arg:--workdir={WORKDIR}",
                       "arg:--distributed=yes", "arg:--config.x=it's $HOME", "arg:-m", "arg:igpt_jax.main"]


# ------------------------------------------------------------------------------------------------ real mode

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stateful stand-in for gcloud: records each call, answers like gcloud for the calls relaunch.sh makes.
printf '%s\n' "$*" >> "$FAKE_DIR/calls"
case "$*" in
  "storage ls "*)
    [[ -f $FAKE_DIR/finished ]] && { echo "$3"; exit 0; }
    echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2; exit 1 ;;
  "compute tpus queued-resources describe "*)
    state=$(<"$FAKE_DIR/qr")
    if [[ $state == NOT_FOUND ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found" >&2; exit 1
    fi
    echo "$state" ;;
  "compute tpus queued-resources delete "*) echo NOT_FOUND > "$FAKE_DIR/qr" ;;
  "compute tpus queued-resources create "*) echo ACTIVE > "$FAKE_DIR/qr" ;;
  "compute tpus tpu-vm scp "*) ;;
  "compute tpus tpu-vm describe "*) echo READY ;;
  "compute tpus tpu-vm ssh "*)
    if [[ $* == *"setsid nohup python3 -m igpt_jax.main"* ]]; then touch "$FAKE_DIR/finished"; fi
    if [[ $* == *"echo running"* ]]; then echo running; fi ;;
  *) echo "fake gcloud: unexpected call: $*" >&2; exit 3 ;;
esac
"""

FAKE_GIT = r"""#!/usr/bin/env bash
# Records `git archive`; answers `git status` with a clean tree.
[[ $3 == archive ]] && printf 'git %s\n' "$*" >> "$FAKE_DIR/calls"
exit 0
"""


@pytest.mark.parametrize("initial, deletes", [("SUSPENDED", True), ("NOT_FOUND", False)])
def test_relaunch_real_mode_against_a_fake_gcloud(tmp_path, initial, deletes):
    """Not a dry run: relaunch.sh parses gcloud's answers, re-creates the slice and stops at FINISHED."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD), ("git", FAKE_GIT)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "qr").write_text(initial + "\n")
    proc = launch("relaunch.sh", "--spot", f"--workdir={WORKDIR}", "--poll-seconds=0",
                  path=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", FAKE_DIR=str(tmp_path),
                  **V4_1024)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # outside a dry run the commands are echoed on stderr
    calls = [c.split()[:5] for c in (tmp_path / "calls").read_text().splitlines()]
    expected = [["storage", "ls", f"{WORKDIR}/FINISHED"],
                ["compute", "tpus", "queued-resources", "describe", "igpt-xl-qr"]]
    if deletes:
        expected.append(["compute", "tpus", "queued-resources", "delete", "igpt-xl-qr"])
    expected += [
        ["compute", "tpus", "queued-resources", "create", "igpt-xl-qr"],
        ["compute", "tpus", "queued-resources", "describe", "igpt-xl-qr"],
        ["git", "-C", str(REPO), "archive", "--format=tar.gz"],
        ["compute", "tpus", "tpu-vm", "scp", TARBALL],
        ["compute", "tpus", "tpu-vm", "ssh", "igpt-xl"],
        ["compute", "tpus", "tpu-vm", "ssh", "igpt-xl"],
        ["storage", "ls", f"{WORKDIR}/FINISHED"],
    ]
    assert calls == expected
    assert "+ gcloud compute tpus queued-resources create igpt-xl-qr" in proc.stderr
    assert "the run is complete" in proc.stderr


# ------------------------------------------------------------------------------------------------ shellcheck


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    # One run over all files (-x follows `source common.sh`); shellcheck needs a few CPU-seconds for them.
    files = [str(LAUNCH / name) for name in ["common.sh", *SCRIPTS]]
    proc = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
