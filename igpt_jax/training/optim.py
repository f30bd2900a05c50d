"""Optimizer and learning-rate schedule of the paper: Adam (b1 0.9, b2 0.95), linear warmup, cosine decay to 0."""

from __future__ import annotations

from typing import Any

import optax
from absl import logging

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(lr: float, *, warmup_steps: int, total_steps: int, kind: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to 0 at `total_steps` (or constant).

    Raises:
      ValueError: for an unknown kind or inconsistent step counts.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule={kind!r}, expected one of {SCHEDULES}")
    if lr <= 0:
        raise ValueError(f"train.lr={lr} must be positive")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps={warmup_steps} and train.num_steps={total_steps} must be >= 0 and > 0")
    warmup_steps = min(warmup_steps, total_steps)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup_steps, 1), alpha=0.0)
    else:
        after = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], boundaries=[warmup_steps])


def make_optimizer(train_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam (or AdamW when weight_decay > 0) with optional global-norm clipping, from ``config.train``."""
    parts = []
    if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    if train_cfg.weight_decay:
        parts.append(
            optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                        weight_decay=train_cfg.weight_decay)
        )
    else:
        parts.append(optax.adam(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps))
    return optax.chain(*parts)


def warmup_steps_for(train_cfg: Any, steps_per_epoch: int) -> int:
    """``train.warmup_steps``, where -1 means one epoch of the training split (the paper).

    One epoch that is at least the whole run (``train.num_steps``) would keep the learning rate below its peak to
    the end and never start the cosine: it is shortened to a tenth of the run, with a one-line warning naming both
    numbers. An explicit count at least the run is refused by the config checks (`igpt_jax.config.checks`).
    """
    if train_cfg.warmup_steps == -1:
        epoch, num_steps = max(1, steps_per_epoch), int(train_cfg.num_steps)
        if epoch < num_steps:
            return epoch
        shortened = num_steps // 10
        logging.warning("train.warmup_steps=-1 is one epoch of %d steps, at least the whole run (train.num_steps=%d): "
                        "warmup shortened to %d steps (a tenth of the run)", epoch, num_steps, shortened)
        return shortened
    if train_cfg.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={train_cfg.warmup_steps}: use -1 (one epoch) or a count >= 0")
    return int(train_cfg.warmup_steps)
