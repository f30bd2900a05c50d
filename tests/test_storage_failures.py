"""Storage failures in one line (igpt_jax/training/checkpoint.py `storage_failure`, igpt_jax/main.py): a write that
fails during a checkpoint save (a full disk, injected here; a real small tmpfs in the slow test), or an unwritable
workdir, ends the run with one line naming the path, the step being saved and the newest intact checkpoint, and the
run resumes from that checkpoint once the cause is fixed."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from etils import epath
from tiny_runs import pretrain_config

from igpt_jax import main
from igpt_jax.config import checks as config_checks
from igpt_jax.errors import StorageError
from igpt_jax.jobs import pretrain

REPO = Path(__file__).resolve().parents[1]
ONE = jax.devices()[:1]


def metric_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def complete_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_from_the_intact_step(
        digits_data_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    config = config_checks.resolve(pretrain_config(digits_data_dir))  # 6 steps, a checkpoint every 2
    path_class = type(epath.Path(str(tmp_path)))
    write_text = path_class.write_text
    failing = workdir / "checkpoints" / "4.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "_METADATA"

    def full_disk(self, *args, **kwargs):  # Orbax's background save writes this file of step 4
        if str(self) == str(failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(path_class, "write_text", full_disk)
    with pytest.raises(StorageError) as err:
        pretrain.run(config, str(workdir), devices=ONE)
    assert str(err.value) == (
        f"could not save step 4 to {workdir / 'checkpoints'}: No space left on device (writing {failing}); newest "
        "intact checkpoint: step 2 (the run resumes from it once the cause is fixed)")
    assert complete_steps(workdir) == [2]

    monkeypatch.setattr(path_class, "write_text", write_text)  # space freed
    resumed = pretrain.run(config, str(workdir), devices=ONE)
    assert resumed["start_step"] == 2 and resumed["finished"] and complete_steps(workdir)[-1] == 6
    assert metric_steps(workdir) == [1, 2, 3, 4, 5, 6]  # every step once


def test_an_unwritable_workdir_ends_the_command_in_one_line_with_status_1(digits_data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" / "run"
    config = config_checks.resolve(pretrain_config(digits_data_dir))
    config.mesh.shape = (-1, 1, 1)  # every device, as the command line's mesh
    with pytest.raises(SystemExit) as exit_:
        main.run_job(config, str(workdir))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"error: could not write {workdir}: Not a directory"]


FILL_AND_RUN = """
set -e
mount -t tmpfs -o size=4m tmpfs "$MNT"
head -c $((4096 * 1024 - FREE)) /dev/zero > "$MNT/filler" || true
set +e
"$PYTHON" -m igpt_jax.main "--config=tests/tiny_runs.py:pretrain,$DATA" --workdir="$MNT/run" \\
    --config.train.num_steps=12 --config.checkpoint.every_steps=2 --config.checkpoint.max_to_keep=10 \\
    > "$OUT/full.out" 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
ls "$MNT/run/checkpoints" > "$OUT/full.steps"
rm "$MNT/filler"
"$PYTHON" -m igpt_jax.main "--config=tests/tiny_runs.py:pretrain,$DATA" --workdir="$MNT/run" \\
    --config.train.num_steps=12 --config.checkpoint.every_steps=2 --config.checkpoint.max_to_keep=10 \\
    > "$OUT/freed.out" 2> "$OUT/freed.err"
echo $? > "$OUT/freed.rc"
cp "$MNT/run/metrics.jsonl" "$OUT/"
"""


@pytest.mark.slow
def test_a_real_full_tmpfs_is_one_line_without_traceback_and_the_run_resumes(digits_data_dir, tmp_path):
    """A 4 MiB tmpfs (mounted in a user and mount namespace: `unshare -r -m`, no root needed where user namespaces
    are allowed) filled to leave about two checkpoints' room; the command line, then again after freeing it.
    Run with: .venv/bin/python -m pytest -q -m slow -n 0 tests/test_storage_failures.py"""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-r", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -r -m (a user namespace) is not allowed here: no tmpfs can be mounted")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
    env = dict(os.environ, XLA_FLAGS=flags, MNT=str(mnt), OUT=str(out), DATA=digits_data_dir,
               PYTHON=sys.executable, FREE=str(700 * 1024))
    subprocess.run(["unshare", "-r", "-m", "bash", "-c", FILL_AND_RUN], cwd=REPO, env=env, check=True, timeout=900)
    err = (out / "full.err").read_text()
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert (out / "full.rc").read_text().strip() == "1", err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert line.startswith("error: could not save step ") and f" to {mnt}/run" in line, line
    assert "No space left on device; newest intact checkpoint: step " in line, line
    intact = [int(s) for s in (out / "full.steps").read_text().split() if s.isdigit()]
    assert intact and line.endswith(f"newest intact checkpoint: step {intact[-1]} (the run resumes from it once the "
                                    "cause is fixed)"), line
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.err").read_text()[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # resumed from the intact step; every step once
