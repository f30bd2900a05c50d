"""Every config field is declared once with its role (igpt_jax/config/settings.py), and the rules read that
declaration: the base config, ``--list``, the resume rules, the pretrained-source rule and AUTO resolution."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from igpt_jax.config import changes as config_changes
from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.config import listing as config_listing
from igpt_jax.config import settings
from igpt_jax.data import config as data_config
from igpt_jax.errors import ConfigError
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.pretrained import sources

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _flat_fields(config) -> set[str]:
    return set(config_listing._flat(config))  # noqa: SLF001


def _redeclare(monkeypatch, sections) -> None:
    """Puts `sections` in place of the declaration, for this test."""
    monkeypatch.setattr(settings, "SECTIONS", tuple(sections))
    monkeypatch.setattr(settings, "SETTINGS", settings.declare(tuple(sections)))


def _replace_section(path: str, **changes):
    return [dataclasses.replace(s, **changes) if s.path == path else s for s in settings.SECTIONS]


# ------------------------------------------------------------------------------------------------ every field
def test_every_field_has_a_role():
    assert settings.undeclared() == []
    assert _flat_fields(config_defaults.base_config()) == set(settings.SETTINGS)
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(settings.MODEL_ROLES)
    assert set(data_config.default_data_config().keys()) == set(settings.DATA_ROLES)
    # the source rule covers every model and data field: from the source, or the job's
    assert {s.role for p, s in settings.SETTINGS.items() if p.startswith("model.")} <= {
        settings.ARCHITECTURE, settings.RUNTIME, settings.SCHEDULE}
    assert {s.role for p, s in settings.SETTINGS.items() if p.startswith("data.")} <= {
        settings.TOKENS, settings.DATA, settings.RUNTIME}
    assert all(s.meaning for s in settings.SETTINGS.values())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_shipped_configs_set_only_declared_fields(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert _flat_fields(module.get_config()) <= set(settings.SETTINGS)


def test_a_model_field_without_a_role_is_found(monkeypatch):
    roles = {k: v for k, v in settings.MODEL_ROLES.items() if k != "dropout"}
    _redeclare(monkeypatch, _replace_section("model", roles=roles | {"no_such_field": settings.RUNTIME}))
    assert settings.undeclared() == ["model.dropout has no role", "model.no_such_field has a role but is no field"]
    assert config_changes.kind_of("model.dropout") == "fixed"  # refused on resume until it is declared


# ------------------------------------------------------------------------------------------------ the rules read it
def test_a_declared_field_is_built_listed_and_classified_on_resume(monkeypatch):
    train = next(s for s in settings.SECTIONS if s.path == "train")
    knob = settings.Setting("knob", 7, settings.SCHEDULE, "a new optimizer knob")
    _redeclare(monkeypatch, _replace_section("train", fields=train.fields + (knob,)))
    config = config_defaults.base_config()
    assert config.train.knob == 7
    assert config_changes.kind_of("train.knob") == "schedule"
    assert config_changes.kind_of("train.knob", "vqvae") == "free"  # the transformer's run, not the VQ-VAE's
    config = config_checks.resolve(config, read_data=False)
    stored = config.to_dict()
    config.train.knob = 8
    assert "schedule      train.knob = 8 [7]  # a new optimizer knob\n" in config_listing.listing(config)
    with pytest.raises(ConfigError, match=r"would change train.knob from 7 to 8: set "):
        config_changes.check_resume(stored, config, step=3, workdir="w", allow_changes=False)
    assert config_changes.check_resume(stored, config, step=3, workdir="w", allow_changes=True) == [
        ("train.knob", 7, 8)]


def test_the_roles_decide_the_resume_rules_of_each_run():
    assert config_changes.kind_of("vqvae.vocab_size", "vqvae") == "fixed"
    assert config_changes.kind_of("vqvae.data.name", "vqvae") == "fixed"
    assert config_changes.kind_of("vqvae.data.num_workers", "vqvae") == "free"
    assert config_changes.kind_of("vqvae.lr", "vqvae") == "schedule"
    assert config_changes.kind_of("seed", "vqvae") == "schedule"
    assert config_changes.kind_of("train.lr", "vqvae") == "free"
    assert config_changes.kind_of("vqvae.lr") == "free"
    assert config_changes.kind_of("model.splash_block_q") == "free"  # runtime, like attention_block
    assert config_changes.kind_of("finetune.lr", "finetune") == "schedule"
    assert config_changes.kind_of("finetune.lr") == "free"


def test_the_source_rule_reads_the_roles(monkeypatch):
    source = ModelConfig(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none")
    job = config_defaults.model_config(d_model=32, n_head=2, n_layer=2, remat="full", dropout=0.1)
    assert sources.ARCHITECTURE_FIELDS == settings.names("model", settings.ARCHITECTURE)
    assert sources.DATA_FIELDS == settings.names("data", settings.TOKENS) == config_checks.SOURCE_DATA_FIELDS
    model = sources.model_config_for_job(job, source, where="the source")
    assert (model.vocab_size, model.remat, model.dropout) == (16, "full", 0.1)  # AUTO vocabulary: the source's
    _redeclare(monkeypatch, _replace_section("model", roles=settings.MODEL_ROLES | {"remat": settings.ARCHITECTURE}))
    with pytest.raises(ConfigError, match=r"model.remat='full' but the source has 'none'"):
        sources.model_config_for_job(job, source, where="the source")


def test_auto_values_are_declared_and_resolved_from_the_declaration(monkeypatch):
    assert settings.is_auto("model.vocab_size", 0) and not settings.is_auto("model.vocab_size", 16)
    assert settings.is_auto("data.augment", data_config.AUTO["augment"])
    assert not settings.is_auto("data.resolution", False) and not settings.is_auto("train.lr", 0)
    config = config_checks.resolve(config_defaults.base_config(), read_data=False)
    assert (config.model.vocab_size, config.model.n_ctx) == (16, 64)  # digits: 16 colours, 8x8
    autos = settings.MODEL_AUTOS | {"n_ctx": settings.Auto(0, "twice the tokens", lambda c: 2 * c.data.resolution**2)}
    _redeclare(monkeypatch, _replace_section("model", autos=autos))
    config = config_checks.resolve(config_defaults.base_config(), read_data=False)
    assert config.model.n_ctx == 128
    assert "(0: twice the tokens)" in config_listing.listing(config)
