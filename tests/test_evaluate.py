"""The evaluate job: exact NLL over a whole split, whatever the batch size or mesh, from the checkpoint alone."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
from tiny_runs import write_checkpoint

from igpt_jax.data import iterators, records
from igpt_jax.jobs import evaluate
from igpt_jax.models import objectives
from igpt_jax.models.igpt import IGPT, ModelConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_data_dir):
    return write_checkpoint(tmp_path_factory, digits_data_dir)


def reference_nll(config, params, palette, split):
    """Mean NLL over every image of the split in one unpadded batch, from the model directly."""
    it = iterators.make_iterator(config.data, split, batch_size=4096, train=False, palette=palette)
    batch = next(it)
    tokens = jnp.asarray(batch["tokens"][batch["mask"]])
    cfg = ModelConfig.from_config(config.model)
    logits = jax.jit(lambda p, t: IGPT(cfg).apply({"params": p}, t).logits)(params, tokens)
    return float(jnp.mean(objectives.token_nll(logits, tokens))), tokens.shape[0]


def test_evaluate_is_exact_over_the_whole_split_for_any_batch_size(run_dir, tmp_path):
    config, source, params, palette = run_dir
    config = config.copy_and_resolve_references()
    config.job = "evaluate"
    config.checkpoint.source_workdir = source
    expected, n_images = reference_nll(config, params, palette, "test")
    n_test = records.num_examples(config.data, "test")
    assert n_images == n_test and n_test % 16  # the last batch of 16 is padded
    results = []
    for batch_size in (16, 64):
        config.evaluate.batch_size = batch_size
        results.append(evaluate.run(config, str(tmp_path), devices=jax.devices()[:1]))
    for result in results:
        assert result["tokens"] == n_test * 64 and result["images"] == n_test and result["step"] == 5
        assert result["nll"] == pytest.approx(expected, abs=1e-5)
        assert result["bits_per_token"] == pytest.approx(result["nll"] / math.log(2), rel=1e-12)
    assert abs(expected - math.log(16)) > 0.05  # a model that is not uniform
    written = json.loads((tmp_path / "eval_test.json").read_text())
    assert written["nll"] == pytest.approx(results[-1]["nll"]) and written["split"] == "test"


def test_evaluate_on_a_2x2x2_mesh_equals_one_device(run_dir, tmp_path):
    config, source, params, palette = run_dir
    config = config.copy_and_resolve_references()
    config.checkpoint.source_workdir = source
    config.evaluate.split = "validation"
    config.evaluate.batch_size = 32
    single = evaluate.run(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    config.mesh.shape = (2, 2, 2)
    sharded = evaluate.run(config, str(tmp_path / "eight"), devices=jax.devices()[:8])
    assert sharded["tokens"] == single["tokens"] == records.num_examples(config.data, "validation") * 64
    assert sharded["nll"] == pytest.approx(single["nll"], abs=1e-5)
    expected, _ = reference_nll(config, params, palette, "validation")
    assert single["nll"] == pytest.approx(expected, abs=1e-5)


def test_evaluate_errors_name_the_problem(run_dir, tmp_path):
    config, source, _, _ = run_dir
    config = config.copy_and_resolve_references()
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
        evaluate.run(config, str(tmp_path), devices=jax.devices()[:1])
    config.checkpoint.source_workdir = source
    config.evaluate.split = "dev"
    with pytest.raises(ValueError, match="evaluate.split='dev'"):
        evaluate.run(config, str(tmp_path), devices=jax.devices()[:1])
    config.evaluate.split = "test"
    config.evaluate.batch_size = 12
    config.mesh.shape = (8, 1, 1)
    with pytest.raises(ValueError, match="evaluate.batch_size=12 is not divisible by the data-parallel size 8"):
        evaluate.run(config, str(tmp_path), devices=jax.devices()[:8])


def test_a_job_reading_a_run_takes_its_tokens_from_the_run_without_overrides(tmp_path):
    """A run trained at 6x6 with 8 colours is evaluated by a config that leaves the data settings to follow the
    data (the shipped configs' AUTO): the job takes resolution, palette size, vocabulary and context from the run
    instead of deriving the digits' 8x8 / 16 colours, and an explicit disagreement is one line naming both."""
    from tiny_runs import pretrain_config  # noqa: PLC0415

    from igpt_jax.config import checks as config_checks  # noqa: PLC0415  # noqa: PLC0415
    from igpt_jax.config import defaults as config_defaults  # noqa: PLC0415
    from igpt_jax.jobs import pretrain  # noqa: PLC0415

    data_dir = str(tmp_path / "tfds")
    run_config = pretrain_config(data_dir, num_steps=2, warmup_steps=1)
    run_config.data.update(resolution=6, n_colors=8)
    run_config.model.update(vocab_size=8, n_ctx=36)
    pretrain.run(run_config, str(tmp_path / "run"), devices=jax.devices()[:1])

    job = config_defaults.base_config()
    job.data = config_defaults.default_data_config("digits", auto=True)
    job.data.data_dir = data_dir
    job.model = config_defaults.model_config(d_model=32, n_head=2, n_layer=2)  # vocabulary and context AUTO
    job.job, job.mesh.shape, job.evaluate.batch_size = "evaluate", (1, 1, 1), 64
    job.checkpoint.source_workdir = str(tmp_path / "run")
    config_checks.resolve(job)
    assert (job.data.resolution, job.data.n_colors, job.model.vocab_size) == (0, 0, 0)  # left to the source
    config_checks.validate(job, num_devices=1)
    result = evaluate.run(job, str(tmp_path / "eval"), devices=jax.devices()[:1])
    assert result["tokens"] == result["images"] * 36 and 0 < result["nll"] < math.log(8) + 1

    job.data.resolution = 5  # an explicit value that disagrees with the run
    with pytest.raises(ValueError, match=r"^the job's config disagrees with .*data.resolution=5 but the source "
                                         r"was trained with 6[^\n]*$"):
        evaluate.run(job, str(tmp_path / "eval5"), devices=jax.devices()[:1])
