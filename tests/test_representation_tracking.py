"""Representation tracking in the pretraining loop: the same figures as the probe job, the right steps in every log,
a resumed run's history, sharded parameters, and bad settings refused before any work."""

import json
import logging
from pathlib import Path

import jax
import pytest
from etils import epath
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tiny_runs import pretrain_config

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.config import checks as config_checks
from igpt_jax.errors import ConfigError
from igpt_jax.jobs import pretrain, probe
from igpt_jax.models.layout import param_layout
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.probing import tracking as representation_tracking

STEPS, EVERY, KILLED_AFTER = 6, 2, 4  # tracked at 2, 4, 6; checkpoints at 3 and 6; killed after tracking step 4
TRAIN_EXAMPLES, VAL_EXAMPLES = 256, 150  # digits: 1,350 training and 150 validation images


def tracking_config(data_dir: str):
    config = pretrain_config(data_dir, num_steps=STEPS)
    config.checkpoint.every_steps = 3
    config.track.every = EVERY
    config.track.train_examples = TRAIN_EXAMPLES
    config.track.val_examples = VAL_EXAMPLES
    config.track.C = (0.1, 1.0)
    config.probe.C_widen = 1
    return config


class Killed(Exception):
    """Stands for SIGKILL arriving after an evaluation and before the next checkpoint."""


def comparable(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if k != "seconds"}


def run_logging_progress(config, workdir) -> tuple[dict, list[str]]:
    """pretrain.run on one device; returns its result and the progress lines it logged."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return pretrain.run(config, str(workdir), devices=jax.devices()[:1]), lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def tracked(pretrained_digits_run, tmp_path_factory):
    """An uninterrupted tracked run: (config, workdir, its result, its progress lines)."""
    config = tracking_config(pretrained_digits_run[0])  # the session's digits
    workdir = tmp_path_factory.mktemp("tracked")
    result, lines = run_logging_progress(config, workdir)
    return config, workdir, result, lines


def tracked_steps_in_logs(workdir: Path) -> tuple[list[dict], list[int]]:
    """The tracking records of metrics.jsonl, and the steps of the TensorBoard events holding track/best_accuracy."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for path in sorted((workdir / "tensorboard").iterdir()):
        for raw in event_file_loader.EventFileLoader(str(path)).Load():
            if raw.HasField("summary") and any(v.tag == "track/best_accuracy" for v in raw.summary.value):
                steps.append(raw.step)
    return [r for r in records if "track/best_accuracy" in r], sorted(steps)


def test_evaluations_land_in_metrics_tensorboard_history_and_plot_at_their_steps(tracked):
    _, workdir, result, lines = tracked
    assert [e["step"] for e in result["tracking"]] == [2, 4, 6]
    assert json.loads((workdir / "tracking.json").read_text()) == result["tracking"]
    tracked_records, tensorboard_steps = tracked_steps_in_logs(workdir)
    assert [r["step"] for r in tracked_records] == tensorboard_steps == [2, 4, 6]
    for record, evaluation in zip(tracked_records, result["tracking"]):
        assert [record[f"track/layer_{l}"] for l in (0, 1, 2)] == evaluation["accuracies"]
        assert record["track/best_layer"] == evaluation["best_layer"]
        assert record["track/best_accuracy"] == max(evaluation["accuracies"])
        assert record["track/val_loss"] == evaluation["val_loss"] > 0
    with Image.open(workdir / workdir_files.TRACKING_PLOT) as img:
        assert img.format == "PNG" and img.size == (900, 600)
    # The progress line after an evaluation shows its seconds and tracking's share of the wall time.
    progress = [line for line in lines if line.startswith("step ") and "tok/s" in line]
    assert any("| track " in line and "s (" in line and "%)" in line for line in progress), progress
    # After the first interval the line shows the model's TFLOP/s per device, and MFU as n/a on the CPU.
    assert all(" TFLOP/s/dev | MFU n/a | ETA " in line for line in progress[1:]), progress
    rates = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if "tflops_per_device" in r]
    assert rates and all("mfu" not in r and r["tflops_per_device"] > 0 for r in rates)


@pytest.mark.slow
def test_a_killed_and_resumed_run_continues_its_history_and_redoes_an_evaluation_with_the_same_numbers(
        tracked, tmp_path):
    config, _, uninterrupted, _ = tracked
    real_evaluate = representation_tracking.Tracker.evaluate

    def evaluate_then_die(self, step, params):  # killed after its evaluation at step 4; last checkpoint: 3
        out = real_evaluate(self, step, params)
        if step == KILLED_AFTER:
            raise Killed
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(representation_tracking.Tracker, "evaluate", evaluate_then_die)
        with pytest.raises(Killed):
            pretrain.run(config, str(tmp_path), devices=jax.devices()[:1])
    killed = json.loads((tmp_path / workdir_files.TRACKING_HISTORY).read_text())
    assert [e["step"] for e in killed] == [2, 4]
    resumed, _ = run_logging_progress(config, tmp_path)
    assert resumed["start_step"] == 3 and [e["step"] for e in resumed["tracking"]] == [2, 4, 6]
    assert [comparable(e) for e in resumed["tracking"]] == [comparable(e) for e in uninterrupted["tracking"]]
    assert comparable(resumed["tracking"][1]) == comparable(killed[1])  # step 4, before and after the kill
    tracked_records, tensorboard_steps = tracked_steps_in_logs(tmp_path)
    assert [r["step"] for r in tracked_records] == tensorboard_steps == [2, 4, 6]  # the killed run's step 4 dropped


def probe_job_config(tracked):
    """The probe job's settings that reproduce the tracking probe on the run's last checkpoint."""
    config, workdir, *_ = tracked
    probe_config = config.copy_and_resolve_references()
    probe_config.job = "probe"
    probe_config.checkpoint.source_workdir = str(workdir)
    probe_config.checkpoint.step = STEPS
    probe_config.probe.update(solver="jax_lbfgs", C=tuple(config.track.C), max_train_examples=TRAIN_EXAMPLES,
                              baselines=False, plots=False, resume=False)
    return probe_config


def test_tracking_equals_the_probe_jobs_library_functions_on_the_same_checkpoint_and_subset(tracked):
    """The probe job's pieces: its parameter loading, feature extraction (its training-set cap, the whole
    validation split) and per-layer fits with its settings, on the checkpoint the run saved at the step."""
    _, _, result, _ = tracked
    config = probe_job_config(tracked)
    mesh, rules = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.DEFAULT_RULES
    with pretrained.open_source(config, "unused") as source:
        model_cfg, palette, data_cfg = source.settings(config, STEPS)
        layout = param_layout(model_cfg, mesh, rules)
        params = source.restore_params(STEPS, layout)
    layers = features_lib.resolve_layers(config.probe.layers, model_cfg.n_layer)
    extractor = features_lib.FeatureExtractor(model_cfg, layout, mesh, rules, data_cfg, palette, layers,
                                              batch_size=config.probe.batch_size or config.train.batch_size)
    train = extractor.extract(params, "train", max_examples=config.probe.max_train_examples)
    val = extractor.extract(params, "validation")
    fits = linear_probe.fit_layers(train.features, train.labels, val.features, val.labels,
                                   linear_probe.ProbeSettings.from_config(config.probe), num_classes=10, layers=layers)
    ours = result["tracking"][-1]
    assert ours["step"] == STEPS and val.n == VAL_EXAMPLES
    assert ours["accuracies"] == [f.val_accuracy for f in fits]
    assert ours["C"] == [f.model.hyper for f in fits]
    assert ours["val_loss"] == pytest.approx(val.loss, rel=1e-6)
    assert max(ours["accuracies"]) > 0.2  # ten classes: chance is 0.1


@pytest.mark.slow
def test_tracking_equals_the_probe_job_on_the_same_checkpoint_and_subset(tracked, tmp_path):
    _, _, result, _ = tracked
    res = probe.run(probe_job_config(tracked), str(tmp_path / "probe"), devices=jax.devices()[:1])
    assert res["examples"]["train"] == TRAIN_EXAMPLES and res["examples"]["validation"] == VAL_EXAMPLES
    ours = result["tracking"][-1]
    theirs = res["checkpoints"][0]
    assert ours["step"] == theirs["step"] == STEPS
    assert ours["accuracies"] == [r["val_accuracy"] for r in theirs["layers"]]
    assert ours["C"] == [r["C"] for r in theirs["layers"]]
    assert ours["best_layer"] == theirs["best_layer"]
    assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-6)
    assert max(ours["accuracies"]) > 0.2  # ten classes: chance is 0.1


@pytest.mark.slow
def test_sharded_parameters_give_the_same_figures(tracked, tmp_path):
    config, workdir, result, _ = tracked
    source_config = config.copy_and_resolve_references()
    source_config.checkpoint.source_workdir = str(workdir)
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    rules = sharding.DEFAULT_RULES
    with pretrained.open_source(source_config, str(workdir)) as source:
        model_cfg, palette, _ = source.settings(source_config, STEPS)
        layout = param_layout(model_cfg, mesh, rules)
        params = source.restore_params(STEPS, layout)
    tracker = representation_tracking.Tracker(config, model_cfg, layout, mesh, rules, palette,
                                              epath.Path(tmp_path), start_step=0)
    got = tracker.evaluate(STEPS, params)
    ours = result["tracking"][-1]
    assert got.best_layer == ours["best_layer"]
    assert got.accuracies == pytest.approx(ours["accuracies"], abs=1.5 / VAL_EXAMPLES)  # at most one image apart
    assert got.val_loss == pytest.approx(ours["val_loss"], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(every=-1), r"^track\.every=-1 must be >= 0$"),
    (dict(every=5, train_examples=0), r"^track\.train_examples=0 must be positive$"),
    (dict(every=5, C=(0.0,)), r"^track\.C=\(0\.0,\) must be positive"),
])
def test_bad_tracking_settings_are_one_line_config_errors(change, message):
    config = tracking_config("/nonexistent")
    config.track.update(change)
    with pytest.raises(ConfigError, match=message):
        config_checks.validate(config)


@pytest.mark.parametrize("data_change, why", [
    (dict(allow_unlabeled=True), "allow_unlabeled"), (dict(fold_val=True), "fold_val"), (dict(val_fraction=0.0), "val_fraction")])
def test_tracking_without_labels_or_validation_images_is_refused(data_change, why):
    config = tracking_config("/nonexistent")
    config.data.update(data_change)
    with pytest.raises(ConfigError, match=rf"^track\.every=2 needs labelled .*data\.{why}"):
        config_checks.validate(config)
    config.track.every = 0
    config_checks.validate(config)  # off: the same data is fine


def test_a_subset_larger_than_the_data_fails_before_any_work(tracked, tmp_path):
    config = tracked[0].copy_and_resolve_references()
    config.track.val_examples = 151
    workdir = tmp_path / "never"
    with pytest.raises(ConfigError,
                       match=r"^track\.val_examples=151 is more than the 150 images of the validation split"):
        pretrain.run(config, str(workdir), devices=jax.devices()[:1])
    assert not workdir.exists()
