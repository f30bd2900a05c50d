"""The validation loop: exact mean negative log-likelihood of a model over a split, in global batches."""

from __future__ import annotations

import math

import jax

from igpt_jax import sharding
from igpt_jax.data import iterators, multihost


def evaluate(eval_fn, params, data_cfg, split: str, *, global_batch: int, mesh, rules, rng, max_batches: int = 0,
             palette=None) -> dict[str, float]:
    """Exact mean NLL (nats and bits per token) over a split (or its first `max_batches` global batches, the same
    examples for any number of processes)."""
    rows = multihost.host_rows(global_batch, mesh, sharding.batch_axes(rules))
    it = iterators.make_iterator(data_cfg, split, batch_size=rows.size, train=False, seed=0, palette=palette,
                                 rows=rows)
    nll_sum, count = 0.0, 0.0
    for i, local in enumerate(it):
        if max_batches and i >= max_batches:
            break
        batch = multihost.make_global_batch(local, mesh, sharding.batch_axes(rules), rows)
        out = jax.device_get(eval_fn(params, batch, jax.random.fold_in(rng, i)))
        nll_sum += float(out["nll_sum"])
        count += float(out["count"])
    nats = nll_sum / max(count, 1.0)
    return {"nll": nats, "bits_per_token": nats / math.log(2), "tokens": count}
