"""The attentive probe (``probe.head='attentive'``): AIM's attention-pooling classifier on frozen token features.

The head (El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image Models", as apple/ml-aim
builds it): the tokens [n, length, width] normalised per channel without affine parameters (AIM's BatchNorm with
neither scale nor bias; here with the training split's statistics, the values its running averages converge to);
one learned query per head attends over every token with key and value projections (no biases); the heads'
outputs, concatenated, go through a linear layer to the classes. Computed without projecting every token: with
query q_h and key projection K_h, the score of token x is (K_h q_h) . x / sqrt(k), and the pooled value
sum_n a_hn V_h^T x_n = V_h^T (sum_n a_hn x_n): the same function (tests/test_attentive_probe.py compares it with the
projections written out) at 1/k of the cost.

Training: AdamW (decoupled weight decay on every weight but the bias), a cosine learning-rate decay over
``epochs`` epochs of shuffled mini-batches; every (learning rate, weight decay) pair of the grid is trained at once
(vmapped, the same batches). After each epoch every pair is scored on the validation split; each pair keeps its
best epoch (early stopping), the pair with the best validation accuracy (ties: the lower validation loss) is the
probe, and its best epoch is scored on test. Unlike the linear probe it is not refitted on train + validation
(the validation split chooses the epoch as well).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax.probing import linear_probe
from igpt_jax.probing import token_store as store_lib

NORM_EPS = 1e-6  # AIM's BatchNorm epsilon
# A low-data fit has few examples per epoch: each of its epochs is at least this many steps.
LOW_DATA_MIN_STEPS = 20


@dataclasses.dataclass(frozen=True)
class AttentiveSettings:
    """How the attentive head is trained; built from ``config.probe`` with `from_config`."""

    heads: int = 4
    lrs: tuple[float, ...] = (1e-2, 3e-3, 1e-3)
    weight_decays: tuple[float, ...] = (0.0, 0.05)
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heads < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"probe.attentive_heads={self.heads}, probe.attentive_epochs={self.epochs} and "
                             f"probe.attentive_batch_size={self.batch_size} must be positive")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"probe.attentive_lrs={self.lrs} must be a non-empty list of positive learning rates")
        if not self.weight_decays or any(wd < 0 for wd in self.weight_decays):
            raise ValueError(f"probe.attentive_weight_decays={self.weight_decays} must be a non-empty list of "
                             "weight decays >= 0")

    @classmethod
    def from_config(cls, pcfg: Any) -> "AttentiveSettings":
        return cls(heads=int(pcfg.attentive_heads), lrs=tuple(float(v) for v in pcfg.attentive_lrs),
                   weight_decays=tuple(float(v) for v in pcfg.attentive_weight_decays),
                   epochs=int(pcfg.attentive_epochs), batch_size=int(pcfg.attentive_batch_size), seed=int(pcfg.seed))

    @property
    def grid(self) -> list[tuple[float, float]]:
        """Every (learning rate, weight decay) pair, trained together."""
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


# ------------------------------------------------------------------------------------------------ the head


def init_head(key: jax.Array, width: int, heads: int, num_classes: int) -> dict[str, jax.Array]:
    """Parameters: query [heads, k], key and value projections [width, heads, k] (k = ceil(width / heads)),
    linear [heads * k, classes] (zeros) and its bias."""
    k = -(-width // heads)
    kq, kk, kv = jax.random.split(key, 3)
    proj = 1.0 / math.sqrt(width)  # Dense layers' LeCun normal
    return {"query": 0.02 * jax.random.normal(kq, (heads, k)),
            "wk": proj * jax.random.normal(kk, (width, heads, k)),
            "wv": proj * jax.random.normal(kv, (width, heads, k)),
            "w": jnp.zeros((heads * k, num_classes)), "b": jnp.zeros((num_classes,))}


def head_logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Class logits [batch, classes] of normalised tokens x [batch, length, width]."""
    heads, k = params["query"].shape
    u = jnp.einsum("chk,hk->ch", params["wk"], params["query"]) / math.sqrt(k)  # [width, heads]
    attn = jax.nn.softmax(jnp.einsum("bnc,ch->bhn", x, u), axis=-1)  # [batch, heads, length]
    pooled = jnp.einsum("bhn,bnc->bhc", attn, x)  # the attention-weighted mean token of each head
    out = jnp.einsum("bhc,chk->bhk", pooled, params["wv"]).reshape(x.shape[0], heads * k)
    return out @ params["w"] + params["b"]


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Per-channel (x - mean) / sqrt(var + eps) with the training split's statistics (no affine parameters)."""

    mean: np.ndarray  # [width]
    var: np.ndarray  # [width]

    @classmethod
    def fit(cls, store: store_lib.TokenStore, feature_set: int, index: np.ndarray, chunk: int = 512
            ) -> "Normaliser":
        """Statistics over every token of the examples ``index`` (streamed in chunks, float64 sums)."""
        total = np.zeros(store.bits.shape[-1])
        squares = np.zeros_like(total)
        count = 0
        for lo in range(0, len(index), chunk):
            x = store_lib.to_float32(store.batch(index[lo: lo + chunk], feature_set)).astype(np.float64)
            total += x.sum(axis=(0, 1))
            squares += np.square(x).sum(axis=(0, 1))
            count += x.shape[0] * x.shape[1]
        mean = total / max(count, 1)
        return cls(mean.astype(np.float32), np.maximum(squares / max(count, 1) - mean**2, 0.0).astype(np.float32))

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, self.var


def normalise(bits: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
    """uint16 bfloat16 bits [..., width] -> float32 normalised by `Normaliser` statistics (mean, var)."""
    mean, var = stats
    return (store_lib.float32_in_jax(bits) - mean) * jax.lax.rsqrt(var + NORM_EPS)


# ------------------------------------------------------------------------------------------------ training


def _loss(params, x, y):
    logp = jax.nn.log_softmax(head_logits(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


@jax.jit
def _train_step(params, opt_state, bits, y, lr, wd, stats):
    """One AdamW step of every grid pair (leading axis of params) on the same batch: lr [pairs] (this step's), wd."""
    x = normalise(bits, stats)
    adam = optax.scale_by_adam()

    def one(p, s, lr, wd):
        grads = jax.grad(_loss)(p, x, y)
        updates, s = adam.update(grads, s)
        updates = {name: u + (wd * p[name] if name != "b" else 0.0) for name, u in updates.items()}
        return jax.tree.map(lambda q, u: q - lr * u, p, updates), s

    return jax.vmap(one)(params, opt_state, lr, wd)


@jax.jit
def _eval_batch(params, bits, y, stats):
    """(correct predictions [pairs], summed NLL [pairs]) of every pair on a batch."""
    x = normalise(bits, stats)

    def one(p):
        logits = head_logits(p, x)
        logp = jax.nn.log_softmax(logits)
        return (jnp.sum(jnp.argmax(logits, -1) == y),
                -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1)))

    return jax.vmap(one)(params)


def evaluate(params, store: store_lib.TokenStore, feature_set: int, norm: Normaliser, batch: int = 512
             ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy [pairs], mean NLL [pairs]) of stacked heads on a whole split."""
    correct = nll = 0.0
    for lo in range(0, store.n, batch):
        idx = np.arange(lo, min(lo + batch, store.n))
        c, n = _eval_batch(params, store.batch(idx, feature_set), store.labels[idx], norm.stats)
        correct, nll = correct + np.asarray(c, np.float64), nll + np.asarray(n, np.float64)
    return correct / max(store.n, 1), nll / max(store.n, 1)


@dataclasses.dataclass
class HeadFit:
    """A trained grid: per pair, its best epoch's parameters, validation accuracy and loss."""

    grid: list[tuple[float, float]]
    params: Any  # stacked [pairs, ...]: each pair's best epoch
    val_accuracy: np.ndarray  # [pairs]
    val_loss: np.ndarray  # [pairs]
    epoch: np.ndarray  # [pairs]: the best epoch (1-based)
    norm: Normaliser

    @property
    def best(self) -> int:
        """The pair with the highest validation accuracy; ties to the lower validation loss, then the first."""
        return max(range(len(self.grid)), key=lambda p: (self.val_accuracy[p], -self.val_loss[p]))

    def pick(self, p: int) -> Any:
        return jax.tree.map(lambda a: a[p: p + 1], self.params)


def fit(train: store_lib.TokenStore, val: store_lib.TokenStore, feature_set: int, settings: AttentiveSettings, *,
        num_classes: int, index: np.ndarray | None = None, grid: Sequence[tuple[float, float]] | None = None,
        min_steps_per_epoch: int = 1, norm: Normaliser | None = None) -> HeadFit:
    """Trains the head of every grid pair on the examples ``index`` of ``train`` (default all), early-stopped on
    ``val``.

    Args:
      train, val: token stores; ``feature_set`` picks the layer (or the average) in both.
      settings: head size, grid, epochs, batch.
      num_classes: number of classes.
      index: the training examples (a low-data subset); None: all.
      grid: the (learning rate, weight decay) pairs (default ``settings.grid``).
      min_steps_per_epoch: an epoch is at least this many steps (small subsets cycle).
      norm: the normaliser (default: fitted on the training examples).
    """
    index = np.arange(train.n) if index is None else np.asarray(index)
    grid = list(grid or settings.grid)
    norm = norm or Normaliser.fit(train, feature_set, index)
    key = jax.random.key(settings.seed)
    one = init_head(key, train.bits.shape[-1], settings.heads, num_classes)
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(grid),) + a.shape), one)
    opt_state = jax.vmap(optax.scale_by_adam().init)(params)
    lrs, wds = (jnp.asarray([g[i] for g in grid], jnp.float32) for i in (0, 1))
    batch = min(settings.batch_size, len(index))
    steps_per_epoch = max(-(-len(index) // batch), min_steps_per_epoch)
    total = settings.epochs * steps_per_epoch
    rng = np.random.default_rng(settings.seed)
    best = (np.full(len(grid), -1.0), np.full(len(grid), np.inf), np.zeros(len(grid), int), params)
    order, pos, step = rng.permutation(index), 0, 0
    for epoch in range(1, settings.epochs + 1):
        for _ in range(steps_per_epoch):
            if pos + batch > len(order):
                order, pos = rng.permutation(index), 0
            idx = order[pos: pos + batch]
            pos += batch
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine decay to 0
            params, opt_state = _train_step(params, opt_state, train.batch(idx, feature_set), train.labels[idx],
                                            lrs * scale, wds, norm.stats)
            step += 1
        acc, loss = evaluate(params, val, feature_set, norm)
        better = (acc > best[0]) | ((acc == best[0]) & (loss < best[1]))
        keep = jnp.asarray(better)
        best = (np.where(better, acc, best[0]), np.where(better, loss, best[1]), np.where(better, epoch, best[2]),
                jax.tree.map(lambda new, old: jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                             params, best[3]))
    return HeadFit(grid, best[3], best[0], best[1], best[2], norm)


# ------------------------------------------------------------------------------------------------ protocol


def probe_sets(train: store_lib.TokenStore, val: store_lib.TokenStore, test: store_lib.TokenStore,
               settings: AttentiveSettings, *, num_classes: int, layers: Sequence[int],
               names: Sequence[str]) -> dict[str, Any]:
    """The attentive probe of every feature set (a layer, or the average of layers): trained on train, the pair and
    epoch chosen on validation, scored on test; the best set on validation is the probe's result.

    Returns:
      A JSON-ready dict: 'solver' ('attentive'), 'layers' (per set: layer, name, lr, weight_decay, epoch,
      val/test accuracy, the validation accuracy of every pair), 'best_layer', 'best' (that set's entry).
    """
    per_set, losses = [], []
    for pos, (layer, name) in enumerate(zip(layers, names)):
        head = fit(train, val, pos, settings, num_classes=num_classes)
        p = head.best
        test_acc, _ = evaluate(head.pick(p), test, pos, head.norm)
        lr, wd = head.grid[p]
        per_set.append({"layer": int(layer), "name": name, "lr": lr, "weight_decay": wd,
                        "epoch": int(head.epoch[p]), "val_accuracy": float(head.val_accuracy[p]),
                        "test_accuracy": float(test_acc[0]), "val_loss": float(head.val_loss[p]),
                        "val_accuracy_by_lr": {f"{g[0]!r},{g[1]!r}": float(a)
                                               for g, a in zip(head.grid, head.val_accuracy)}})
        losses.append(float(head.val_loss[p]))
    best = max(range(len(per_set)), key=lambda i: (per_set[i]["val_accuracy"], -losses[i]))
    return {"solver": "attentive", "layers": per_set, "best_layer": per_set[best]["layer"],
            "best": {**per_set[best], "test_accuracy_train_only": per_set[best]["test_accuracy"]}}


def low_data(train: store_lib.TokenStore, val: store_lib.TokenStore, test: store_lib.TokenStore, feature_set: int,
             settings: AttentiveSettings, best: dict[str, Any], *, num_classes: int, budgets: Sequence[int],
             subsets: int) -> list[dict[str, Any]]:
    """Low-data attentive probes (paper 4.7) of one feature set with its chosen learning rate and weight decay:
    ``subsets`` class-balanced subsets per budget (the linear probe's draw), each early-stopped on validation
    (epochs of at least `LOW_DATA_MIN_STEPS` steps), scored on test; the normaliser is the whole training split's."""
    norm = Normaliser.fit(train, feature_set, np.arange(train.n))
    rng = np.random.default_rng(settings.seed + 2)
    results = []
    for budget in budgets:
        accs = []
        for _ in range(int(subsets)):
            idx = linear_probe.balanced_subset(train.labels, int(budget), num_classes, rng)
            head = fit(train, val, feature_set, settings, num_classes=num_classes, index=idx,
                       grid=[(best["lr"], best["weight_decay"])], min_steps_per_epoch=LOW_DATA_MIN_STEPS, norm=norm)
            accs.append(float(evaluate(head.pick(0), test, feature_set, norm)[0][0]))
        mean, sd = float(np.mean(accs)), float(np.std(accs))
        results.append({"budget": int(budget), "test_accuracies": accs, "mean_accuracy": mean, "std_accuracy": sd,
                        "mean_error_percent": 100 * (1 - mean), "std_error_percent": 100 * sd})
    return results
