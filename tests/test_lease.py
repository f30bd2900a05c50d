"""One writer per workdir (igpt_jax/training/lease.py): a second run is refused naming the holder, a stale or dead
holder's lease is taken over with a warning, a run whose lease was taken stops before it writes again."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import pytest
from etils import epath
from tiny_runs import pretrain_config

from igpt_jax.config import checks as config_checks
from igpt_jax.errors import WorkdirInUse
from igpt_jax.jobs import pretrain
from igpt_jax.training import lease as lease_lib
from igpt_jax.training.loop import TrainingRun
from igpt_jax.training.run_log import RunLog


def held_by(workdir: Path, **holder) -> lease_lib.Holder:
    """Writes a lease file as another run would have (fields of `Holder` overridden by `holder`)."""
    now = time.time()
    record = dataclasses.replace(lease_lib.Holder("other-host", 4242, now - 60, now - 5, "t0"), **holder)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lease.json").write_bytes(record.to_bytes())
    return record


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "lease" in r.getMessage()]


def test_a_live_holder_refuses_a_second_run_in_one_line_and_keeps_its_lease(tmp_path):
    holder = held_by(tmp_path, started=0.0)
    second = lease_lib.WorkdirLease(epath.Path(tmp_path))
    with pytest.raises(WorkdirInUse) as err:
        second.acquire()
    assert str(err.value) == (
        f"workdir {tmp_path} is in use by another run (host other-host, pid 4242, started 1970-01-01 00:00:00 UTC, "
        "last heartbeat 5 s ago): stop that run, or rerun once its heartbeat is older than 180 s, or pass "
        "--config.checkpoint.take_over=True")
    assert lease_lib.Holder.from_bytes((tmp_path / "lease.json").read_bytes()) == holder


@pytest.mark.parametrize("case", ["stale heartbeat", "dead process", "take_over"])
def test_a_stale_dead_or_forced_lease_is_taken_over_with_a_warning(tmp_path, caplog, case):
    if case == "dead process":  # a run on this host killed with SIGKILL (and reaped)
        proc = subprocess.Popen(["sleep", "60"])
        proc.kill()
        proc.wait()
        held_by(tmp_path, host=lease_lib.socket.gethostname(), pid=proc.pid)
    else:
        held_by(tmp_path, heartbeat=time.time() - (181 if case == "stale heartbeat" else 1))
    caplog.clear()
    with lease_lib.WorkdirLease(epath.Path(tmp_path), take_over=case == "take_over") as lease:
        (line,) = warnings_of(caplog)
        assert line.startswith(f"took over the lease on {tmp_path}: ") and "(host " in line
        assert {"stale heartbeat": "its heartbeat is older than 180 s", "dead process": "its process is gone",
                "take_over": "checkpoint.take_over=True"}[case] in line
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == lease.holder.token
    assert not (tmp_path / "lease.json").exists()  # released on leaving


def test_the_holder_whose_lease_was_taken_stops_and_heartbeats_renew_it(tmp_path):
    clock = [1000.0]
    first = lease_lib.WorkdirLease(epath.Path(tmp_path), heartbeat_seconds=3600, clock=lambda: clock[0])
    first.acquire()
    clock[0] += 100
    assert first.renew() and json.loads((tmp_path / "lease.json").read_text())["heartbeat"] == 1100.0
    first.check(read=True)  # still its own
    clock[0] += 181  # no heartbeat for longer than STALE_SECONDS: a new run takes over
    second = lease_lib.WorkdirLease(epath.Path(tmp_path), heartbeat_seconds=3600, clock=lambda: clock[0])
    second.acquire()
    with pytest.raises(WorkdirInUse, match=rf"^another run took over workdir {tmp_path} \(host .*, pid {os.getpid()}, "
                                           r"started .*, last heartbeat 0 s ago\); this run stops without writing"):
        first.check(read=True)
    assert not first.renew()
    first.release()  # leaves the new holder's lease alone
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == second.holder.token
    second.release()
    assert not (tmp_path / "lease.json").exists()


def test_two_concurrent_runs_the_second_refused_the_first_intact(digits_data_dir, tmp_path, monkeypatch):
    """The second run starts while the first is at step 3 (from inside the first's step loop, so the timing is
    exact), is refused, and then stops the first with SIGTERM (it saves step 3 and returns)."""
    workdir = tmp_path / "run"
    config = config_checks.resolve(pretrain_config(digits_data_dir))  # 6 steps, a checkpoint every 2
    refused = []
    add = RunLog.add

    def add_then_start_a_second_run(self, step, metrics):
        add(self, step, metrics)
        if step == 3:
            try:  # the skeleton of any training job: pretrain.run itself would start inside this run's mesh
                with TrainingRun(str(workdir), config.checkpoint, num_steps=6, log_every=1):
                    refused.append(None)  # not reached: entering takes the lease
            except WorkdirInUse as err:
                refused.append(str(err))
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLog, "add", add_then_start_a_second_run)
    first = pretrain.run(config, str(workdir), devices=jax.devices()[:1])
    (message,) = refused
    assert re.fullmatch(rf"workdir {workdir} is in use by another run \(host .*, pid {os.getpid()}, started .*, last "
                        r"heartbeat \d+ s ago\): stop that run, .*", message)
    assert first["preempted"] and first["step"] == 3
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # every step of the first run once, nothing of the second
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 3]
    assert not (workdir / "lease.json").exists()  # the first run released it
