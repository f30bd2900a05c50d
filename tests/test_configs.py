"""Every shipped config loads, documents how to run it, and describes a model its data fits."""

import ast
import importlib.util
from pathlib import Path

import pytest

from igpt_jax import config_checks
from igpt_jax.model import ModelConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configs_are_found():
    assert {"demo", "cifar10_cpu", "igpt_s", "igpt_m", "igpt_l", "igpt_xl"} <= {p.stem for p in CONFIGS}


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
    assert config.job == "pretrain"
    assert set(config.then) <= {"probe", "finetune", "sample", "evaluate"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_refuses_an_unknown_variant_in_one_line(path):
    with pytest.raises(ValueError, match=r"^config variant 'nosuchvariant': unknown argument 'nosuchvariant'; "
                                         r"this config takes [^\n]*$"):
        _load(path).get_config("nosuchvariant")
