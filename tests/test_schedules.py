"""Schedules that make sense or say so: a warmup of at least the whole run, and periods longer than the run."""

import pytest
from tiny_runs import pretrain_config

from igpt_jax.config import checks as config_checks
from igpt_jax.data import records
from igpt_jax.errors import ConfigError
from igpt_jax.jobs import pretrain
from igpt_jax.training.loop import Evaluation, long_periods


def test_an_epoch_of_warmup_longer_than_the_run_is_shortened_with_one_line_naming_both(digits_data_dir, caplog):
    config = pretrain_config(digits_data_dir, warmup_steps=-1, num_steps=40, lr=1e-2)
    epoch = records.num_examples(config.data, "train") // 16
    assert epoch > 40  # the digits: about 100 steps of 16 per epoch
    caplog.clear()
    schedule = pretrain.learning_rate_schedule(config)
    (line,) = [r.getMessage() for r in caplog.records if "warmup shortened" in r.getMessage()]
    assert line == (f"train.warmup_steps=-1 is one epoch of {epoch} steps, at least the whole run "
                    "(train.num_steps=40): warmup shortened to 4 steps (a tenth of the run)")
    assert float(schedule(2)) == pytest.approx(5e-3) and float(schedule(4)) == pytest.approx(1e-2)  # peak at 4
    assert 0 < float(schedule(20)) < 1e-2 and float(schedule(40)) == pytest.approx(0.0, abs=1e-9)  # then the cosine

    config.train.num_steps = 10 * epoch  # an epoch shorter than the run: kept, and nothing said
    caplog.clear()
    schedule = pretrain.learning_rate_schedule(config)
    assert not [r for r in caplog.records if "warmup" in r.getMessage() and r.levelname == "WARNING"]
    assert float(schedule(epoch // 2)) < 1e-2 and float(schedule(epoch)) == pytest.approx(1e-2)


@pytest.mark.parametrize("section,num_steps", [("train", 6), ("finetune", 30)])
def test_an_explicit_warmup_of_at_least_the_run_is_refused_naming_both(digits_data_dir, section, num_steps):
    config = config_checks.resolve(pretrain_config(digits_data_dir))
    config.job = "pretrain" if section == "train" else "finetune"
    config[section].num_steps = num_steps
    config[section].warmup_steps = num_steps - 1
    config_checks.validate(config)
    config[section].warmup_steps = num_steps
    with pytest.raises(ConfigError, match=rf"^{section}.warmup_steps={num_steps} is at least the whole run "
                                          rf"\({section}.num_steps={num_steps}\): the learning rate would never reach "
                                          rf"its peak; choose fewer than {num_steps} warmup steps \(e.g. "
                                          rf"{num_steps // 10}\)$"):
        config_checks.validate(config)


def test_periods_longer_than_the_run_are_each_one_line_naming_both_numbers():
    evaluations = [Evaluation(100, lambda s, x: None, setting="train.eval_every"),
                   Evaluation(30, lambda s, x: None, setting="track.every"),
                   Evaluation(31, lambda s, x: None, setting="finetune.eval_every")]
    assert long_periods(30, 200, evaluations) == [
        "checkpoint.every_steps=200 is longer than the run (30 steps): a checkpoint is saved only at the last step "
        "(and on SIGTERM or Ctrl-C)",
        "train.eval_every=100 is longer than the run (30 steps): it runs only at the last step",
        "finetune.eval_every=31 is longer than the run (30 steps): it runs only at the last step"]
    assert long_periods(30, 30, evaluations[1:2]) == []
