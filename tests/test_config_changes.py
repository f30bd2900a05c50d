"""Which settings a resumed run may change (igpt_jax/config/changes.py), on configs alone."""

import json

import pytest

from igpt_jax import workdir as workdir_files
from igpt_jax.config import changes as config_changes
from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults


@pytest.mark.parametrize("field, kind", [
    ("model.d_model", "fixed"), ("model.vocab_size", "fixed"), ("data.name", "fixed"), ("data.resolution", "fixed"),
    ("model.remat", "free"), ("model.attention", "free"), ("data.data_dir", "free"), ("data.num_workers", "free"),
    ("train.lr", "schedule"), ("train.num_steps", "schedule"), ("model.dropout", "schedule"), ("seed", "schedule"),
    ("train.log_every", "free"), ("train.grad_accum_steps", "free"), ("mesh.shape", "free"),
    ("checkpoint.every_steps", "free"),
])
def test_each_field_has_its_kind(field, kind):
    assert config_changes.kind_of(field) == kind


def test_changes_compare_as_stored_and_the_history_records_each(tmp_path):
    resolved = lambda: config_checks.resolve(config_defaults.base_config(), read_data=False)  # noqa: E731
    stored = json.loads(resolved().to_json_best_effort())  # tuples stored as lists
    current = resolved()
    assert config_changes.changes(stored, current) == []
    current.train.lr, current.train.log_every = 1e-3, 5
    diff = config_changes.check_resume(stored, current, step=7, workdir="w", allow_changes=True)
    assert diff == [("train.log_every", 10, 5), ("train.lr", 3e-3, 1e-3)]
    config_changes.record(tmp_path, 7, diff)
    config_changes.record(tmp_path, 9, diff[:1])
    lines = [json.loads(line) for line in (tmp_path / workdir_files.CONFIG_HISTORY).read_text().splitlines()]
    assert [(r["step"], r["field"], r["old"], r["new"]) for r in lines] == [
        (7, "train.log_every", 10, 5), (7, "train.lr", 3e-3, 1e-3), (9, "train.log_every", 10, 5)]
    with pytest.raises(ValueError, match=r"would change train.lr from 0.003 to 0.001: set "):
        config_changes.check_resume(stored, current, step=7, workdir="w", allow_changes=False)
    current.data.n_colors = 8
    with pytest.raises(ValueError, match=r"with data.n_colors=8: the checkpoint was trained with data.n_colors=16,"):
        config_changes.check_resume(stored, current, step=7, workdir="w", allow_changes=True)
