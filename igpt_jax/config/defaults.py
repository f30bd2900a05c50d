"""What the config files in configs/ build with: the defaults, the paper's models, variants and the CPU shrink.

A config file calls `base_config()` (every field at its default, as `igpt_jax.config.settings` declares it),
changes what its model or experiment needs, and returns it; the command line can then override any field
(`--config.train.lr=3e-3`). The result is locked, so a misspelt field is an error rather than a silently ignored
setting.
"""

from __future__ import annotations

import ml_collections

from igpt_jax.config import settings
from igpt_jax.config.settings import AUTO, model_config  # noqa: F401  (re-exported for configs)
from igpt_jax.data.config import default_data_config  # noqa: F401  (re-exported for configs)

# Paper Table 5 (autoregressive, 32x32x3): S 0.003, M 0.003, L 0.001; L at 48x48: 0.01. BERT: S 0.01, M 0.003, L 0.001.
PAPER_SIZES = {
    "s": dict(n_layer=24, d_model=512, n_head=8),
    "m": dict(n_layer=36, d_model=1024, n_head=8),
    "l": dict(n_layer=48, d_model=1536, n_head=16),
    "xl": dict(n_layer=60, d_model=3072, n_head=24),  # heads not published; 24 heads of 128
}


def base_config() -> ml_collections.ConfigDict:
    """All settings with their defaults (a small CPU-friendly model on the embedded digits dataset).

    Every field, its default, meaning and role is declared in `igpt_jax.config.settings`; this is a fresh copy.
    """
    return settings.build_config()


def paper_model(size: str, *, n_ctx: int = AUTO, objective: str = "ar", **overrides) -> ml_collections.ConfigDict:
    """The paper's model of a size ('s', 'm', 'l', 'xl') at a context length; the vocabulary is the palette's (512
    colours for the paper's datasets)."""
    return model_config(n_ctx=n_ctx, objective=objective, **PAPER_SIZES[size], **overrides)


def parse_arg(arg: str | None, **defaults):
    """Parses a config variant string such as ``runlocal,objective=bert,res=48`` (big_vision style).

    Bare words set a boolean default to True; ``key=value`` pairs are converted to the default's type. A config
    that takes no variant calls ``parse_arg(arg)``, so that any variant is an error.

    Raises:
      ValueError: one line, for a key that has no default (naming the known ones) or a value of the wrong type.
    """
    known = ", ".join(f"{k}" if isinstance(v, bool) else f"{k}={v}" for k, v in sorted(defaults.items()))
    takes = f"this config takes {known}" if defaults else "this config takes no variant"
    values = dict(defaults)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, raw = part.partition("=")
        if key not in defaults:
            raise ValueError(f"config variant {arg!r}: unknown argument {key!r}; {takes}")
        default = defaults[key]
        if isinstance(default, bool):
            if sep and raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config variant {arg!r}: {key}={raw!r} must be true or false")
            values[key] = not sep or raw.lower() in ("1", "true", "yes")
        elif not sep:
            raise ValueError(f"config variant {arg!r}: {key} needs a value, e.g. {key}={default}")
        else:
            try:
                values[key] = type(default)(raw)
            except ValueError:
                raise ValueError(f"config variant {arg!r}: {key}={raw!r} must be of type {type(default).__name__} "
                                 f"(default {default})") from None
    return ml_collections.ConfigDict(values)


def make_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a paper config to a few hundred CPU steps on CIFAR-10 (from ../shared/data), in place.

    Keeps the objective, resolution and vocabulary; a 4-layer, width-128 model, batch 16, 300 steps, warmup 30.
    """
    resolution = config.data.resolution
    config.data = default_data_config("cifar10", auto=True)
    config.data.resolution = resolution
    config.model = model_config(objective=config.model.objective, d_model=128, n_head=4, n_layer=4, remat="none")
    config.train.batch_size = 16
    config.train.num_steps = 300
    config.train.warmup_steps = 30
    config.train.lr = 3e-3
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.checkpoint.every_steps = 100
