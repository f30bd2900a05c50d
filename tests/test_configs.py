"""Every shipped config loads, documents how to run it, and describes a model its data fits."""

import ast
import importlib.util
from pathlib import Path

import pytest

from igpt_jax.config import checks as config_checks
from igpt_jax.models.igpt import ModelConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configs_are_found():
    assert {"demo", "cifar10_cpu", "igpt_s", "igpt_m", "igpt_l", "igpt_xl", "openai_cifar10"} <= {
        p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_documents_and_builds_a_consistent_model(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    for field in ("Command:", "Hardware:", "Time:", "Result:"):
        assert field in doc, f"{path.name}: docstring has no {field!r} line"
    assert f"--config=configs/{path.name}" in doc
    config = config_checks.resolve(_load(path).get_config())
    config_checks.validate(config)
    model = ModelConfig.from_config(config.model)
    assert config.data.resolution**2 <= model.n_ctx
    assert model.vocab_size == config.data.n_colors
    # a probe config reads a converted model (openai_cifar10.py); lr_search_cifar10.py searches cifar10_cpu.py's lr
    assert config.job in {"pretrain", "vqvae", "probe", "lr_search"}
    assert set(config.then) <= {"probe", "finetune", "sample", "evaluate", "tokenize", "pretrain"}


def test_openai_cifar10_variants_are_the_released_models():
    module = _load(next(p for p in CONFIGS if p.stem == "openai_cifar10"))
    sizes = {v: ModelConfig.from_config(config_checks.resolve(module.get_config(v)).model) for v in ("s", "m", "l")}
    assert [(c.n_layer, c.d_model, c.n_head, c.n_ctx, c.vocab_size) for c in sizes.values()] == [
        (24, 512, 8, 1024, 512), (36, 1024, 8, 1024, 512), (48, 1536, 16, 1024, 512)]
    config = module.get_config("l")
    assert config.probe.concat_layers == 11 and tuple(config.probe.low_data_budgets) == (40, 250, 4000)
    assert config.job == "probe" and tuple(config.then) == ("finetune",)
    with pytest.raises(ValueError, match="choose one size"):
        module.get_config("s,m")


def test_follow_up_jobs_read_the_run_just_trained_or_the_same_source():
    pretraining = config_checks.resolve(_load(next(p for p in CONFIGS if p.stem == "cifar10_cpu")).get_config())
    [(probe, probe_dir), (finetune, _)] = config_checks.follow_up_jobs(pretraining, "/runs/cifar")
    assert (probe.job, probe.checkpoint.source_workdir, probe.checkpoint.step, tuple(probe.then), probe_dir) == (
        "probe", "/runs/cifar", -1, (), "/runs/cifar/probe")
    probing = _load(next(p for p in CONFIGS if p.stem == "openai_cifar10")).get_config("s")
    probing.checkpoint.source_workdir = "/models/igpt_s"
    [(finetune, _)] = config_checks.follow_up_jobs(probing, "/runs/probe")
    assert (finetune.job, finetune.checkpoint.source_workdir) == ("finetune", "/models/igpt_s")
    chain = _load(next(p for p in CONFIGS if p.stem == "vqvae_cifar10")).get_config()
    follow = config_checks.follow_up_jobs(chain, "/runs/vq")
    assert [(c.job, c.checkpoint.source_workdir, w) for c, w in follow] == [
        ("tokenize", "/runs/vq", "/runs/vq/tokenize"), ("pretrain", "/runs/vq", "/runs/vq/pretrain"),
        ("probe", "/runs/vq/pretrain", "/runs/vq/probe")]



@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_refuses_an_unknown_variant_in_one_line(path):
    with pytest.raises(ValueError, match=r"^config variant 'nosuchvariant': unknown argument 'nosuchvariant'; "
                                         r"this config takes [^\n]*$"):
        _load(path).get_config("nosuchvariant")
