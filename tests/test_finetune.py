"""The fine-tuning job on the embedded digits, from the tiny pretraining run of test_probe (made once per session)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import FINETUNE_EVAL_EVERY as EVAL_EVERY
from tiny_runs import FINETUNE_STEPS as STEPS
from tiny_runs import PRETRAIN_STEPS, finetune_config

from igpt_jax import sharding
from igpt_jax.data import iterators, records
from igpt_jax.jobs import finetune
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.models.layout import param_layout, random_params


@pytest.fixture(scope="session")
def run(pretrained_digits_run):
    return pretrained_digits_run


@pytest.fixture(scope="session")
def full_run(finetune_results):
    return finetune_results


def test_finetuning_improves_validation_accuracy_over_the_zero_head(run, full_run):
    workdir, res = full_run
    # The zero head predicts class 0 everywhere: its accuracy is class 0's share of the validation split.
    config = finetune_config(run)
    labels = np.concatenate([b["label"][b["mask"]] for b in iterators.make_iterator(
        config.data, "validation", batch_size=150, train=False)])
    assert res["initial_val_accuracy"] == pytest.approx(np.mean(labels == 0))
    assert [h["step"] for h in res["val_history"]] == [0, 20, 40]
    assert res["best_val_accuracy"] >= res["initial_val_accuracy"] + 0.1
    assert res["best_val_accuracy"] == max(h["val_accuracy"] for h in res["val_history"])
    assert res["best_step"] in (20, 40) and res["test_accuracy"] > 0.15  # chance: 0.1
    assert res["pretrained_step"] == PRETRAIN_STEPS and res["source_checkpoint"].endswith(f"/{PRETRAIN_STEPS}")
    written = json.loads((Path(workdir) / "results.json").read_text())
    assert written["test_accuracy"] == res["test_accuracy"] and written["config"]["finetune"]["num_classes"] == 10
    assert (Path(workdir) / "best" / "checkpoints" / str(res["best_step"])).is_dir()
    assert "best: step" in res["table"]


def test_resumed_finetuning_equals_the_uninterrupted_run(run, full_run, tmp_path):
    _, full = full_run
    config = finetune_config(run)
    first = finetune.run(config, str(tmp_path), devices=jax.devices()[:1], stop_at_step=EVAL_EVERY + 5)
    assert first["preempted"] and first["step"] == EVAL_EVERY + 5
    (tmp_path / "metrics.jsonl").unlink()  # as on gs://, where it is not written: the history is the run's own
    second = finetune.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert second["resumed"] and second["start_step"] == EVAL_EVERY + 5
    losses = [h["loss"] for h in first["history"] + second["history"]]
    assert losses == [h["loss"] for h in full["history"]]  # bit-exact, data position included
    for key in ("best_step", "best_val_accuracy", "initial_val_accuracy", "test_accuracy"):
        assert second[key] == full[key], key
    assert second["val_history"] == full["val_history"]  # from the run's own file, not metrics.jsonl
    # The pretrained source and the wall time are the whole job's, not the resumed segment's.
    assert second["source_checkpoint"] == full["source_checkpoint"]
    assert [(s["from_step"], s["to_step"]) for s in second["segments"]] == [(0, EVAL_EVERY + 5), (EVAL_EVERY + 5, STEPS)]
    assert second["seconds"] == pytest.approx(sum(s["seconds"] for s in second["segments"]))
    assert all(s["seconds"] > 0 for s in second["segments"])
    # A finished run relaunched changes nothing and reports the same.
    again = finetune.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert again["start_step"] == STEPS and again["test_accuracy"] == full["test_accuracy"]
    assert again["segments"][:2] == second["segments"] and again["source_checkpoint"] == full["source_checkpoint"]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(run, tmp_path, monkeypatch):
    accuracies = iter([0.5, 0.4, 0.45, 0.3])  # validation at steps 0, 2, 4, then the test split

    def fake_accuracy(self, params, split):
        return {"accuracy": next(accuracies), "examples": 1}

    monkeypatch.setattr(finetune.Evaluator, "accuracy", fake_accuracy)
    config = finetune_config(run, num_steps=12, eval_every=2, patience=2, objective="gen+clf")
    res = finetune.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert res["early_stopped"] and res["steps"] == 4 and res["best_step"] == 0
    assert all(h["gen_loss"] > 0 for h in res["history"])  # L_GEN + L_CLF
    assert res["best_val_accuracy"] == 0.5 and res["test_accuracy"] == 0.3
    assert [h["step"] for h in res["val_history"]] == [0, 2, 4]
    # Stopped early, the run is finished: FINISHED names its last step, and a rerun says so and reads its results.
    assert (tmp_path / "FINISHED").read_text() == "4\n"
    again = finetune.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert again["finished"] and again["start_step"] == 4 and again["test_accuracy"] == 0.3 and again["early_stopped"]


def test_bad_inputs_fail_with_what_and_where(run, full_run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"finetune.num_classes=5 but dataset 'digits' .* has 10 classes"):
        finetune.run(finetune_config(run, num_classes=5), str(tmp_path / "a"), devices=jax.devices()[:1])
    config = finetune_config(run)
    config.checkpoint.source_workdir = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*nothing/checkpoints"):
        finetune.run(config, str(tmp_path / "b"), devices=jax.devices()[:1])
    config = finetune_config(run)
    config.model.n_layer = 3
    with pytest.raises(ValueError, match=r"checkpoints/40: model\.n_layer=3 but the source has 2"):
        finetune.run(config, str(tmp_path / "c"), devices=jax.devices()[:1])
    # Resuming a run whose head was made for another number of classes (a copy of the finished run, unfinished).
    workdir, _ = full_run
    shutil.copytree(workdir, tmp_path / "d")
    (tmp_path / "d" / "FINISHED").unlink()
    monkeypatch.setattr(records, "num_classes", lambda data_cfg: 7)
    with pytest.raises(ValueError, match=r"checkpoints/40 has a head for 10 classes but dataset 'digits' has 7"):
        finetune.run(finetune_config(run), str(tmp_path / "d"), devices=jax.devices()[:1])


def test_bert_predictions_use_independent_masks_per_example():
    cfg = ModelConfig(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none", attention="dense",
                      objective="bert")
    mesh, rules = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.DEFAULT_RULES
    layout = param_layout(cfg, mesh, rules)
    params = {"model": jax.device_get(random_params(cfg, layout, mesh, rules, jax.random.key(0))),
              "head": {"w": jax.random.normal(jax.random.key(1), (32, 10))}}
    tokens = jax.random.randint(jax.random.key(2), (32, 64), 0, 16)
    batch = {"tokens": tokens, "label": jnp.zeros(32, jnp.int32), "mask": jnp.ones(32, bool),
             "index": jnp.arange(32, dtype=jnp.int32)}
    fn = jax.jit(lambda p, b: finetune.predict_step(p, b, model_cfg=cfg, head_layer=-1, num_masks=3, seed=0))
    out = fn(params, batch)
    assert out["predictions"].shape == (3, 32)
    assert len({tuple(np.asarray(p)) for p in out["predictions"]}) > 1  # the masks differ
    # Each example's masks depend only on its record index: reversing the batch reverses the predictions.
    flipped = fn(params, jax.tree.map(lambda x: x[::-1], batch))
    np.testing.assert_array_equal(np.asarray(flipped["predictions"]), np.asarray(out["predictions"])[:, ::-1])
