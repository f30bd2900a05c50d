"""The pod path on a local GCS server (the `gcs_server` fixture, tests/conftest.py): a pretraining run whose workdir is
gs://bucket/run writes its checkpoints (Orbax through TensorStore), metrics.jsonl, TensorBoard events, segments.json,
config.json, the lease and FINISHED there; killed with SIGKILL, it resumes bit-exactly, with the losses of the same
run on local disk; a probe and a fine-tuning job read it from gs://.

The TFDS data_dir stays on local disk: array_record's reader (which `tfds.data_source` reads records with) opens
gs:// paths in its own C++ code, which no setting points at another server (README, "Reliability").

Slow (about two minutes here: three processes start): .venv/bin/python -m pytest -q -m slow -n 0 tests/test_gcs_workdir.py
"""

import json
from pathlib import Path

import cli_runner
import jax
import pytest
from etils import epath
from tiny_runs import SHORT_STEPS, finetune_config, metric_records, probe_config, short_training_config

from igpt_jax.config import checks as config_checks
from igpt_jax.jobs import finetune, pretrain, probe

ONE = jax.devices()[:1]
pytestmark = pytest.mark.slow


def complete_steps(objects: Path) -> list[int]:
    """The checkpoint steps Orbax has finished writing on the server (on GCS a step is committed by this file)."""
    directory = objects / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if (p / "commit_success.txt").exists())


def kill_after_first_checkpoint(data_dir: str, workdir: str, objects: Path, output: Path) -> list[int]:
    cli_runner.kill_when([f"--config=tests/tiny_runs.py:pretrain,{data_dir}", f"--workdir={workdir}"],
                         lambda: bool(complete_steps(objects)), output)
    return complete_steps(objects)


def test_pretrain_sigkill_resume_probe_and_finetune_with_every_workdir_on_gs(gcs_server, digits_data_dir, tmp_path):
    _, root = gcs_server
    config = config_checks.resolve(short_training_config("pretrain", digits_data_dir))
    local = pretrain.run(config, str(tmp_path / "local"), devices=ONE)  # the same run on local disk

    workdir, objects = "gs://bucket/run", root / "bucket" / "run"
    for attempt in range(3):  # a stalled machine can miss the short run's middle: then kill a fresh run again
        killed_at = kill_after_first_checkpoint(digits_data_dir, f"{workdir}{attempt}", Path(f"{objects}{attempt}"),
                                                tmp_path / "output")
        if killed_at and killed_at[-1] < SHORT_STEPS:
            workdir, objects = f"{workdir}{attempt}", Path(f"{objects}{attempt}")
            break
    assert killed_at and killed_at[-1] < SHORT_STEPS, (tmp_path / "output").read_text()[-3000:]
    assert (objects / "lease.json").exists() and not (objects / "FINISHED").exists()  # a killed run's lease

    resumed = pretrain.run(config, workdir, devices=ONE)  # takes the dead process's lease over
    assert resumed["resumed"] and resumed["finished"] and 1 <= resumed["start_step"] <= killed_at[-1]
    losses = [h["loss"] for h in local["history"]]
    assert [h["loss"] for h in resumed["history"]] == losses[resumed["start_step"]:]
    assert metric_records(objects) == metric_records(tmp_path / "local")
    assert (objects / "FINISHED").read_text() == f"{SHORT_STEPS}\n" and not (objects / "lease.json").exists()
    assert json.loads((objects / "config.json").read_text())["train"]["num_steps"] == SHORT_STEPS
    assert [s["from_step"] for s in json.loads((objects / "segments.json").read_text())] == [0, resumed["start_step"]]
    assert len(list((objects / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the killed run's, the resumed's
    assert complete_steps(objects) == [SHORT_STEPS - 1, SHORT_STEPS]

    probe_cfg = probe_config((digits_data_dir, workdir), C=(1.0,), C_widen=0, baselines=False, solver="lbfgs")
    probed = probe.run(probe_cfg, "gs://bucket/probe", devices=ONE)
    assert probed["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    stored = json.loads(epath.Path("gs://bucket/probe/results.json").read_text())
    assert (stored["test_accuracy"], stored["best_layer"]) == (probed["test_accuracy"], probed["best_layer"])

    tuned = {}
    for name, source in (("gs", workdir), ("local", str(tmp_path / "local"))):
        ft_cfg = finetune_config((digits_data_dir, source), num_steps=4, eval_every=2)
        out = f"gs://bucket/finetune_{name}" if name == "gs" else str(tmp_path / "finetune")
        tuned[name] = finetune.run(ft_cfg, out, devices=ONE)
    assert [h["loss"] for h in tuned["gs"]["history"]] == [h["loss"] for h in tuned["local"]["history"]]
    assert tuned["gs"]["test_accuracy"] == tuned["local"]["test_accuracy"]
