"""A workdir written by the code before the package redesign (tests/fixtures/legacy_workdir, made by
tests/fixtures/make_legacy_workdir.py at commit 78738eb) resumes bit-exactly and is read by every downstream job."""

import json
import shutil
from pathlib import Path

import jax
import pytest
from tiny_runs import pretrain_config

from igpt_jax.jobs import evaluate, finetune, pretrain, probe, sample

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_workdir"


@pytest.fixture
def legacy(tmp_path, digits_data_dir):
    """(config, workdir, expected) of a copy of the legacy workdir, its config pointed at the session's digits."""
    workdir = tmp_path / "legacy"
    shutil.copytree(LEGACY, workdir)
    expected = json.loads((workdir / "expected.json").read_text())
    return pretrain_config(digits_data_dir), str(workdir), expected


def test_legacy_workdir_resumes_bit_exactly(legacy):
    config, workdir, expected = legacy
    result = pretrain.run(config, workdir, devices=jax.devices()[:1])
    assert result["resumed"] and result["start_step"] == expected["stopped_at"] and result["finished"]
    assert [h["loss"] for h in result["history"]] == expected["losses"][expected["stopped_at"]:]  # bit-exact
    logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "loss" in r] == expected["losses"]  # every step once, the old ones kept
    assert (Path(workdir) / "FINISHED").read_text().strip() == str(expected["num_steps"])


def test_legacy_workdir_is_read_by_probe_finetune_sample_and_evaluate(legacy, tmp_path):
    config, workdir, expected = legacy
    one = jax.devices()[:1]
    config.checkpoint.source_workdir = workdir
    config.job = "probe"
    config.probe.update(solver="lbfgs", C=(1.0,), C_widen=0, baselines=False, batch_size=64)
    probed = probe.run(config, str(tmp_path / "probe"), devices=one)
    assert probed["checkpoints"][0]["step"] == expected["stopped_at"]
    assert len(probed["checkpoints"][0]["layers"]) == 3  # two blocks and the final norm
    config.job = "finetune"
    config.finetune.update(num_steps=2, eval_every=2, batch_size=16, eval_batch_size=160)
    tuned = finetune.run(config, str(tmp_path / "finetune"), devices=one)
    assert tuned["pretrained_step"] == expected["stopped_at"] and tuned["steps"] == 2
    config.job = "sample"
    config.sample.update(mode="unconditional", num_samples=2, batch_size=2)
    sampled = sample.run(config, str(tmp_path / "sample"), devices=one)
    assert sampled["samples"].shape == (2, 64)
    config.job = "evaluate"
    config.evaluate.update(split="test", batch_size=64)
    evaluated = evaluate.run(config, str(tmp_path / "evaluate"), devices=one)
    assert evaluated["step"] == expected["stopped_at"] and 0 < evaluated["nll"] < 3.0
