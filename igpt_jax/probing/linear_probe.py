"""Linear classifiers on fixed features: the paper's probes (2.4, 4.1-4.4, 4.7) and BERT mask ensembling (4.6).

Everything here works on host arrays, independent of how the features were made:

  * features of a split: float32 [masks, n, layers, d] (masks = 1 for autoregressive models; a BERT model's
    validation and test features are extracted under several independent masks), labels int [n];
  * the training split always has one mask (the probe is fitted on features of in-distribution, masked inputs).

Solvers:
  * 'auto' (default): 'jax_lbfgs' for problems of at least `AUTO_JAX_FROM` problems x examples x features, where it is
    faster, compilation included; 'lbfgs' below, where compiling costs more than it saves (`solver_for`).
  * 'jax_lbfgs': multinomial L2 logistic regression with scikit-learn's objective, fitted by full-batch
    L-BFGS in JAX (`igpt_jax.probing.logreg_jax`): all layers (or all low-data subsets) in one compiled call,
    warm-started along the C grid; its accuracies equal scikit-learn's within a few tenths of a point
    (tests/test_probe_solver.py).
  * 'lbfgs': scikit-learn's multinomial `LogisticRegression` (L-BFGS), one problem at a time (the reference).
    For both: features standardised on the training split, the inverse L2 strength C searched over a grid on the
    validation split (CIFAR/STL probes in the paper); the grid widens itself (`probe.C_widen` more values per
    side, within `probe.C_bounds`) while a problem's best C sits at its edge, so no choice is decided by the grid's end.
  * 'sgd': softmax regression trained in JAX with SGD (momentum 0.9, cosine decay to 0), the learning rate searched
    on the validation split; all layers and learning rates are trained at once (vmapped), for large datasets
    (the paper's ImageNet probe).

Predictions of several masks are combined by `modal_prediction` (the most frequent class, ties broken at random).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax.probing import logreg_jax

SOLVERS = ("auto", "jax_lbfgs", "lbfgs", "sgd")
LOGISTIC_SOLVERS = ("auto", "jax_lbfgs", "lbfgs")  # C-grid solvers with scikit-learn's objective
# 'auto' fits with the JAX solver from this many problems x examples x features on, with scikit-learn below it,
# where the JAX solver's compilation costs more than it saves. Measured (bench/bench_solver_crossover.py,
# bench/RESULTS.md "Probe solver: where 'auto' switches"): the JAX solver was faster at every size from 8.19M on
# (2-4.5x), scikit-learn at 9 of the 11 sizes of 2.05M and below.
AUTO_JAX_FROM = 8_000_000


def solver_for(solver: str, problems: int, n: int, d: int) -> str:
    """The solver that fits `problems` problems of n examples x d features: `solver`, or for 'auto' the JAX L-BFGS
    from `AUTO_JAX_FROM` problems x n x d on and scikit-learn's below."""
    if solver != "auto":
        return solver
    return "jax_lbfgs" if problems * n * d >= AUTO_JAX_FROM else "lbfgs"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """How a probe is fitted; built from ``config.probe`` with `ProbeSettings.from_config`."""

    solver: str = "auto"
    C: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    max_iter: int = 1000
    C_widen: int = 4
    C_bounds: tuple[float, float] = (1e-6, 1e4)
    standardize: bool = True
    sgd_lrs: tuple[float, ...] = (30.0, 10.0, 3.0, 1.0)
    sgd_steps: int = 1000
    sgd_batch_size: int = 256
    sgd_momentum: float = 0.9
    sgd_weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"probe.solver={self.solver!r}, expected one of {SOLVERS}")
        if not self.C or any(c <= 0 for c in self.C):
            raise ValueError(f"probe.C={self.C} must be a non-empty list of positive inverse regularisation strengths")
        if not self.sgd_lrs or any(lr <= 0 for lr in self.sgd_lrs):
            raise ValueError(f"probe.sgd_lrs={self.sgd_lrs} must be a non-empty list of positive learning rates")
        if self.C_widen < 0 or len(self.C_bounds) != 2 or not 0 < self.C_bounds[0] <= self.C_bounds[1]:
            raise ValueError(f"probe.C_widen={self.C_widen} must be >= 0 and probe.C_bounds={self.C_bounds} a pair "
                             "0 < low <= high")
        if self.max_iter < 1 or self.sgd_steps < 1 or self.sgd_batch_size < 1:
            raise ValueError("probe.max_iter, probe.sgd_steps and probe.sgd_batch_size must be positive")

    @classmethod
    def from_config(cls, cfg: Any) -> "ProbeSettings":
        return cls(
            solver=str(cfg.solver), C=tuple(float(c) for c in cfg.C), max_iter=int(cfg.max_iter),
            C_widen=int(cfg.get("C_widen", 4)), C_bounds=tuple(float(c) for c in cfg.get("C_bounds", (1e-6, 1e4))),
            standardize=bool(cfg.standardize), sgd_lrs=tuple(float(v) for v in cfg.sgd_lrs),
            sgd_steps=int(cfg.sgd_steps), sgd_batch_size=int(cfg.sgd_batch_size),
            sgd_momentum=float(cfg.sgd_momentum), sgd_weight_decay=float(cfg.sgd_weight_decay), seed=int(cfg.seed),
        )

    @property
    def hyper_name(self) -> str:
        return "C" if self.solver in LOGISTIC_SOLVERS else "lr"


# --------------------------------------------------------------------------------------------------- small pieces


def modal_prediction(predictions: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """The most frequent class of each column of ``predictions`` [masks, n]; ties broken uniformly at random."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 1:
        return predictions
    if predictions.shape[0] == 1:
        return predictions[0]
    counts = np.zeros((predictions.shape[1], num_classes), np.float64)
    np.add.at(counts, (np.arange(predictions.shape[1])[None, :].repeat(predictions.shape[0], 0), predictions), 1.0)
    # Integer counts plus noise in [0, 0.5): only classes tied at the maximum compete, each equally likely.
    return np.argmax(counts + 0.5 * rng.random(counts.shape), axis=1)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else float("nan")


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-dimension (x - mean) / std, fitted on a training matrix; constant dimensions are left unscaled."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, enabled: bool = True) -> "Standardizer":
        x = np.asarray(x, np.float64)
        if not enabled:
            return cls(np.zeros(x.shape[1:], np.float32), np.ones(x.shape[1:], np.float32))
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 1e-8 * max(1.0, float(np.abs(mean).max(initial=0.0))), std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


def concat_window(best: int, num_layers: int, k: int) -> list[int]:
    """Positions of ``k`` consecutive layers centred on ``best`` (shifted to stay inside [0, num_layers))."""
    k = min(int(k), num_layers)
    start = min(max(best - k // 2, 0), num_layers - k)
    return list(range(start, start + k))


def balanced_subset(labels: np.ndarray, budget: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``budget`` examples, as balanced over classes as possible (the remainder to random classes).

    Raises:
      ValueError: when the budget is smaller than the number of classes or a class has too few examples.
    """
    labels = np.asarray(labels)
    if budget < num_classes:
        raise ValueError(f"low-data budget {budget} is smaller than the number of classes {num_classes}")
    per_class = np.full(num_classes, budget // num_classes)
    per_class[rng.choice(num_classes, budget % num_classes, replace=False)] += 1
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class[c]:
            raise ValueError(
                f"low-data budget {budget} needs {per_class[c]} examples of class {c}, but the training split has "
                f"only {len(members)}"
            )
        picks.append(rng.choice(members, per_class[c], replace=False))
    return np.sort(np.concatenate(picks))


# --------------------------------------------------------------------------------------------------- classifiers


@dataclasses.dataclass
class LinearModel:
    """A fitted linear classifier on standardised features: logits = standardize(x) @ w + b."""

    w: np.ndarray  # [d, classes]
    b: np.ndarray  # [classes]
    standardizer: Standardizer
    hyper: float

    def logits(self, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Logits of x [..., n, d] -> [..., n, classes], computed in `dtype`."""
        return self.standardizer(x).astype(dtype, copy=False) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class predictions of x [..., n, d] -> [..., n]."""
        return np.argmax(self.logits(x), axis=-1)

    def predict_ensemble(self, x: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        """Modal prediction over the masks of x [masks, n, d]."""
        return modal_prediction(self.predict(x), num_classes, rng)


# Below this many feature values a fit runs with one BLAS thread: threaded BLAS on tiny matrices is up to 100x slower
# on a busy machine (measured: digits, 1350 x 64, 2 shared cores), and large problems still get every core.
SMALL_PROBLEM = 1 << 20


def _blas_threads(size: int):
    if size > SMALL_PROBLEM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (a scikit-learn dependency)

    return threadpool_limits(1)


def _lbfgs_fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, num_classes: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's LogisticRegression(C, lbfgs) on x [n, d]; returns (w [d, classes], b [classes])."""
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    present = np.unique(y)
    if len(present) == 1:  # scikit-learn refuses one class: predict it everywhere
        w = np.zeros((x.shape[1], num_classes), np.float32)
        b = np.full(num_classes, -1.0, np.float32)
        b[present[0]] = 1.0
        return w, b
    clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings(), _blas_threads(x.size):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    w = np.zeros((x.shape[1], num_classes), np.float32)
    b = np.full(num_classes, -np.inf, np.float32)  # classes absent from training are never predicted
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary problems come back as one row
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    w[:, clf.classes_] = coef.T
    b[clf.classes_] = intercept
    return w, b


def fit_logistic(x: np.ndarray, y: np.ndarray, C: np.ndarray, settings: ProbeSettings, *, num_classes: int,
                 init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One multinomial L2 logistic regression per problem, with the solver of ``settings``.

    Args:
      x: [problems, n, d] features (already standardised).
      y: [n] labels shared by every problem, or [problems, n].
      C: [problems] inverse L2 strengths.
      settings: 'jax_lbfgs' (all problems in one compiled call, warm-started from ``init``), 'lbfgs'
        (scikit-learn, one by one) or 'auto' (`solver_for`: by problems x n x d).
      num_classes: number of classes.
      init: (w [problems, d, k], b [problems, k]) warm start; used by 'jax_lbfgs' only.

    Returns:
      (w [problems, d, k], b [problems, k]); classes absent from a problem's labels have b = -inf.
    """
    x = np.asarray(x)
    y = np.broadcast_to(np.asarray(y), x.shape[:2])
    if solver_for(settings.solver, *x.shape) == "jax_lbfgs":
        w, b, _ = logreg_jax.fit(x, y, C, num_classes=num_classes, init=init, max_iter=settings.max_iter)
        return w, b
    fits = [_lbfgs_fit(x[p], y[p], float(C[p]), settings.max_iter, num_classes) for p in range(x.shape[0])]
    return np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits])


def fit_lbfgs(x: np.ndarray, y: np.ndarray, C: float, *, num_classes: int, max_iter: int = 1000,
              standardize: bool = True, solver: str = "lbfgs") -> LinearModel:
    """Multinomial L2 logistic regression (scikit-learn's or the JAX L-BFGS) on standardised x [n, d]."""
    std = Standardizer.fit(x, standardize)
    settings = ProbeSettings(solver=solver, max_iter=max_iter)
    w, b = fit_logistic(std(x)[None], y, np.array([C]), settings, num_classes=num_classes)
    return LinearModel(w[0], b[0], std, C)


@dataclasses.dataclass
class GridSearch:
    """The C search of several problems: every fitted C's solution and validation accuracy, per problem."""

    accuracies: list[dict[float, float]]  # per problem: C -> validation accuracy
    solutions: list[dict[float, tuple[np.ndarray, np.ndarray]]]  # per problem: C -> (w [d, k], b [k])

    def best(self, p: int) -> float:
        """Problem p's best C: the highest validation accuracy, ties to the stronger regularisation (smaller C)."""
        accs = self.accuracies[p]
        return max(sorted(accs), key=lambda c: accs[c])  # max keeps the first (smallest) of equal accuracies


def widened_value(tried: Sequence[float], upward: bool) -> float:
    """The next C beyond the edge of ``tried``: the outermost step of the grid repeated (x10 for a single value)."""
    grid = sorted(tried)
    if len(grid) < 2:
        return grid[0] * (10.0 if upward else 0.1)
    return grid[-1] * grid[-1] / grid[-2] if upward else grid[0] * grid[0] / grid[1]


def search_C(x: np.ndarray, y: np.ndarray, score: Callable[[np.ndarray, np.ndarray], np.ndarray],
             settings: ProbeSettings, *, num_classes: int) -> GridSearch:
    """Fits every problem at every C of the grid (ascending, warm-started), then widens each problem's grid.

    While a problem's best C is the largest (smallest) value it tried, it tries one more value beyond that edge,
    the grid's outermost step repeated, up to ``settings.C_widen`` values per side and within ``settings.C_bounds``.
    Problems that need no more values are refitted at their edge (and ignored) so that all stay in one batch.

    Args:
      x: [problems, n, d] standardised training features; y: [n] or [problems, n] labels.
      score: (w [problems, d, k], b [problems, k]) -> validation accuracy [problems].
      settings: solver, grid and widening.

    Returns:
      The search, with every problem's accuracies and solutions.
    """
    problems = x.shape[0]
    search = GridSearch([{} for _ in range(problems)], [{} for _ in range(problems)])

    def run(C: np.ndarray, init, record: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, b = fit_logistic(x, y, C, settings, num_classes=num_classes, init=init)
        accs = score(w, b)
        for p in np.flatnonzero(record):
            search.accuracies[p][float(C[p])] = float(accs[p])
            search.solutions[p][float(C[p])] = (w[p], b[p])
        return w, b

    init = None
    for C in sorted(settings.C):
        init = run(np.full(problems, C), init, np.ones(problems, bool))
    low, high = settings.C_bounds
    for upward in (True, False):
        for _ in range(settings.C_widen):
            edges = [max(a) if upward else min(a) for a in search.accuracies]
            nxt = np.array([widened_value(list(a), upward) for a in search.accuracies])
            need = np.array([search.best(p) == edges[p] and low <= nxt[p] <= high for p in range(problems)])
            if not need.any():
                break
            C = np.where(need, nxt, edges)
            init_w = np.stack([search.solutions[p][edges[p]][0] for p in range(problems)])
            init_b = np.stack([search.solutions[p][edges[p]][1] for p in range(problems)])
            run(C, (init_w, init_b), need)
    return search


def sgd_fit(x: np.ndarray, y: np.ndarray, lrs: Sequence[float], *, num_classes: int, steps: int, batch_size: int,
            momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regressions on every layer of x [n, layers, d] and every learning rate at once, in JAX.

    SGD with momentum, the learning rate decayed from ``lr`` to 0 by a cosine over ``steps``; mini-batches drawn
    with replacement. The problems are independent (the loss is their sum and each has its own parameters).

    Returns:
      (w [lrs, layers, d, classes], b [lrs, layers, classes]) as numpy arrays.
    """
    n, num_layers, d = x.shape
    lr_scale = jnp.asarray(lrs, jnp.float32)[:, None, None]  # momentum is linear: scaling the gradient = scaling lr
    tx = optax.sgd(optax.cosine_decay_schedule(1.0, steps), momentum=momentum)
    params = {"w": jnp.zeros((len(lrs), num_layers, d, num_classes)),
              "b": jnp.zeros((len(lrs), num_layers, num_classes))}
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = jnp.einsum("nld,rldk->rlnk", xb, p["w"]) + p["b"][:, :, None, :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, yb[None, None, :, None], axis=-1)[..., 0]
        return jnp.sum(jnp.mean(nll, axis=-1))

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(loss_fn)(p, xb, yb)
        g = {"w": (g["w"] + weight_decay * p["w"]) * lr_scale[..., None], "b": g["b"] * lr_scale}
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    batch = min(batch_size, n)
    for _ in range(steps):
        idx = rng.integers(0, n, batch)
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    w, b = jax.device_get((params["w"], params["b"]))
    w, b = np.array(w), np.array(b)
    bad = ~np.isfinite(w).all(axis=(2, 3)) | ~np.isfinite(b).all(axis=2)
    w[bad], b[bad] = 0.0, 0.0  # a diverged learning rate predicts class 0 (and loses the selection)
    return w, b


# --------------------------------------------------------------------------------------------------- probes


@dataclasses.dataclass
class LayerFit:
    """The probe of one layer (or one concatenation of layers) fitted on the training split."""

    layer: int
    model: LinearModel
    val_accuracy: float
    val_accuracies: dict[float, float]  # hyper-parameter -> validation accuracy
    val_loss: float = float("nan")  # the chosen model's mean validation NLL (over masks and examples): breaks ties


def validation_loss(model: LinearModel, x: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of labels y [n] under the model on x [masks, n, d], over masks and n."""
    from scipy.special import log_softmax  # noqa: PLC0415  (scikit-learn's stack: imported when used, ~2 s)

    log_p = log_softmax(model.logits(x, np.float64), axis=-1)
    labels = np.broadcast_to(y, log_p.shape[:-1])[..., None]
    return float(-np.mean(np.take_along_axis(log_p, labels, -1)))


def _split_layers(x: np.ndarray) -> np.ndarray:
    """[masks, n, layers, d] (or [n, layers, d]) -> [masks, n, layers, d]."""
    x = np.asarray(x)
    return x[None] if x.ndim == 3 else x


def fit_layers(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               settings: ProbeSettings, *, num_classes: int, layers: Sequence[int] | None = None,
               rng: np.random.Generator | None = None) -> list[LayerFit]:
    """Fits a probe per layer on the training split, choosing its hyper-parameter on the validation split.

    Args:
      train_x: [n, layers, d] (or [1, n, layers, d]) training features.
      train_y: [n] labels.
      val_x: [masks, n_val, layers, d] (or [n_val, layers, d]) validation features; several masks are ensembled.
      val_y: [n_val] labels.
      settings: solver and grid.
      num_classes: number of classes.
      layers: the layer ids to report (default 0..layers-1), one per position of the layer axis.
      rng: tie-breaking of the mask ensemble.

    Returns:
      One `LayerFit` per layer position.
    """
    train_x = _split_layers(train_x)[0]
    val_x = _split_layers(val_x)
    rng = rng or np.random.default_rng(settings.seed)
    num_layers = train_x.shape[1]
    layers = list(range(num_layers)) if layers is None else list(layers)
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    fits = []
    if settings.solver in LOGISTIC_SOLVERS:
        stds = [Standardizer.fit(train_x[:, pos], settings.standardize) for pos in range(num_layers)]
        xs = np.stack([stds[p](train_x[:, p]) for p in range(num_layers)])  # [layers, n, d]
        xv = [stds[p](val_x[:, :, p]) for p in range(num_layers)]  # [masks, n_val, d] each

        def score(w, b):
            return np.array([accuracy(modal_prediction(np.argmax(xv[p] @ w[p] + b[p], -1), num_classes, rng), val_y)
                             for p in range(num_layers)])

        search = search_C(xs, train_y, score, settings, num_classes=num_classes)
        for pos in range(num_layers):
            C = search.best(pos)
            w, b = search.solutions[pos][C]
            model = LinearModel(w, b, stds[pos], C)
            fits.append(LayerFit(layers[pos], model, search.accuracies[pos][C],
                                 dict(sorted(search.accuracies[pos].items())),
                                 validation_loss(model, val_x[:, :, pos], val_y)))
        return fits
    stds = [Standardizer.fit(train_x[:, pos], settings.standardize) for pos in range(num_layers)]
    xs = np.stack([stds[p](train_x[:, p]) for p in range(num_layers)], axis=1)
    w, b = sgd_fit(xs, train_y, settings.sgd_lrs, num_classes=num_classes, steps=settings.sgd_steps,
                   batch_size=settings.sgd_batch_size, momentum=settings.sgd_momentum,
                   weight_decay=settings.sgd_weight_decay, seed=settings.seed)
    for pos in range(num_layers):
        xv = stds[pos](val_x[:, :, pos])
        best, accs = None, {}
        for r, lr in enumerate(settings.sgd_lrs):
            model = LinearModel(w[r, pos], b[r, pos], stds[pos], lr)
            acc = accuracy(model.predict_ensemble(xv, num_classes, rng), val_y)
            accs[lr] = acc
            if best is None or acc > best[0]:
                best = (acc, model)
        fits.append(LayerFit(layers[pos], best[1], best[0], accs, validation_loss(best[1], val_x[:, :, pos], val_y)))
    return fits


def refit(x: np.ndarray, y: np.ndarray, hyper: float, settings: ProbeSettings, *, num_classes: int) -> LinearModel:
    """Fits one probe with a chosen hyper-parameter (C or learning rate) on x [n, d] (e.g. train + validation)."""
    if settings.solver in LOGISTIC_SOLVERS:
        return fit_lbfgs(x, y, hyper, num_classes=num_classes, max_iter=settings.max_iter,
                         standardize=settings.standardize, solver=settings.solver)
    std = Standardizer.fit(x, settings.standardize)
    w, b = sgd_fit(std(x)[:, None], y, [hyper], num_classes=num_classes, steps=settings.sgd_steps,
                   batch_size=settings.sgd_batch_size, momentum=settings.sgd_momentum,
                   weight_decay=settings.sgd_weight_decay, seed=settings.seed)
    return LinearModel(w[0, 0], b[0, 0], std, hyper)


def best_position(fits: Sequence[LayerFit]) -> int:
    """Position of the layer with the highest validation accuracy; ties go to the lower validation loss (the
    probe's mean NLL, a finer measure of the same fit: on 150 validation images several layers often tie), then to
    the earliest layer."""
    def key(p: int) -> tuple[float, float]:
        loss = fits[p].val_loss
        return fits[p].val_accuracy, -(loss if np.isfinite(loss) else np.inf)

    return max(range(len(fits)), key=key)  # max keeps the first of equal keys


def evaluate_model(model: LinearModel, x: np.ndarray, y: np.ndarray, *, num_classes: int,
                   rng: np.random.Generator) -> dict[str, float]:
    """Accuracy of the mask ensemble on x [masks, n, d] and, with several masks, of the first mask alone."""
    x = np.asarray(x)
    x = x[None] if x.ndim == 2 else x
    out = {"accuracy": accuracy(model.predict_ensemble(x, num_classes, rng), y)}
    if x.shape[0] > 1:
        out["accuracy_single_mask"] = accuracy(model.predict(x[0]), y)
    return out


def probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
          test: tuple[np.ndarray, np.ndarray], settings: ProbeSettings, *, num_classes: int,
          layers: Sequence[int] | None = None, concat_layers: int = 0,
          layer_names: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The full linear-probe protocol on extracted features.

    1. Per layer: fit on train, choose the hyper-parameter on validation, report validation accuracy and the test
       accuracy of that train-only probe.
    2. The best layer is the one with the highest validation accuracy; its probe is refitted on train + validation
       with the chosen hyper-parameter and scored on test (the paper's reported number).
    3. Optionally the same for ``concat_layers`` layers centred on the best one, concatenated.

    Args:
      train, val, test: (features, labels) with features [masks, n, layers, d] ([n, layers, d] accepted).
      settings: solver and grid.
      num_classes: number of classes.
      layers: the layer id of each position of the layer axis.
      concat_layers: 0 (off) or the number of layers to concatenate.
      layer_names: layer id -> a readable name, for the report.

    Returns:
      A JSON-ready dict: 'layers' (per layer: layer, name, hyper-parameter, val/test accuracy, the validation
      accuracy of every grid value), 'best_layer', 'best' (layer, hyper-parameter, val accuracy, test accuracy after
      refitting on train + validation, and its single-mask accuracy for several masks), and 'concat' when asked.
    """
    rng = np.random.default_rng(settings.seed + 1)
    (tx, ty), (vx, vy), (sx, sy) = train, val, test
    tx, vx, sx = _split_layers(tx)[0], _split_layers(vx), _split_layers(sx)
    num_layers = tx.shape[1]
    layers = list(range(num_layers)) if layers is None else list(layers)
    names = layer_names or (lambda l: f"layer {l}")
    fits = fit_layers(tx, ty, vx, vy, settings, num_classes=num_classes, layers=layers, rng=rng)
    hyper = settings.hyper_name
    per_layer = []
    for pos, fit in enumerate(fits):
        test_acc = evaluate_model(fit.model, sx[:, :, pos], sy, num_classes=num_classes, rng=rng)
        per_layer.append({
            "layer": fit.layer, "name": names(fit.layer), hyper: fit.model.hyper, "val_accuracy": fit.val_accuracy,
            "test_accuracy": test_acc["accuracy"], "val_loss": fit.val_loss,
            "val_accuracy_by_" + hyper: {repr(k): v for k, v in fit.val_accuracies.items()},
        })
    pos = best_position(fits)
    best = fits[pos]
    final = refit(np.concatenate([tx[:, pos], vx[0, :, pos]]), np.concatenate([ty, vy]), best.model.hyper, settings,
                  num_classes=num_classes)
    test_acc = evaluate_model(final, sx[:, :, pos], sy, num_classes=num_classes, rng=rng)
    out: dict[str, Any] = {
        "solver": settings.solver,
        "layers": per_layer,
        "best_layer": best.layer,
        "best": {"layer": best.layer, "name": names(best.layer), hyper: best.model.hyper,
                 "val_accuracy": best.val_accuracy, "test_accuracy": test_acc["accuracy"],
                 "test_accuracy_train_only": per_layer[pos]["test_accuracy"],
                 **({"test_accuracy_single_mask": test_acc["accuracy_single_mask"]}
                    if "accuracy_single_mask" in test_acc else {})},
    }
    if concat_layers and concat_layers > 1:
        window = concat_window(pos, num_layers, concat_layers)

        def cat(x):  # [..., layers, d] -> [..., 1, k*d]
            return x[..., window, :].reshape(x.shape[:-2] + (1, len(window) * x.shape[-1]))

        cfit = fit_layers(cat(tx), ty, cat(vx), vy, settings, num_classes=num_classes, rng=rng)[0]
        cfinal = refit(np.concatenate([cat(tx)[:, 0], cat(vx)[0, :, 0]]), np.concatenate([ty, vy]), cfit.model.hyper,
                       settings, num_classes=num_classes)
        ctest = evaluate_model(cfinal, cat(sx)[:, :, 0], sy, num_classes=num_classes, rng=rng)
        out["concat"] = {"layers": [layers[p] for p in window], hyper: cfit.model.hyper,
                         "features": len(window) * tx.shape[-1], "val_accuracy": cfit.val_accuracy,
                         "test_accuracy": ctest["accuracy"]}
    return out


def low_data(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], settings: ProbeSettings, *, num_classes: int,
             budgets: Sequence[int], subsets: int = 5) -> list[dict[str, Any]]:
    """Low-data classification (paper 4.7) on one layer's features.

    For each label budget: ``subsets`` random class-balanced subsets of the training split; on each, a probe with
    its hyper-parameter chosen on the validation split, scored on test. Features are standardised with the whole
    training split's statistics (which use no labels).

    Args:
      train, val, test: (features [masks, n, d] or [n, d], labels).

    Returns:
      Per budget: budget, per-subset test accuracies, their mean and (population) standard deviation, and the
      mean error in percent (the paper's Table 4 unit).
    """
    (tx, ty), (vx, vy), (sx, sy) = train, val, test
    tx = np.asarray(tx)
    tx = tx[0] if tx.ndim == 3 else tx
    vx, sx = np.asarray(vx), np.asarray(sx)
    vx, sx = (vx[None] if vx.ndim == 2 else vx), (sx[None] if sx.ndim == 2 else sx)
    std = Standardizer.fit(tx, settings.standardize)
    tx, vx, sx = std(tx), std(vx), std(sx)
    plain = dataclasses.replace(settings, standardize=False)
    rng = np.random.default_rng(settings.seed + 2)
    results = []
    for budget in budgets:
        subsets_idx = [balanced_subset(ty, int(budget), num_classes, rng) for _ in range(int(subsets))]
        if settings.solver in LOGISTIC_SOLVERS:  # the subsets are independent problems: one batch
            def score(w, b):
                return np.array([accuracy(modal_prediction(np.argmax(vx @ w[p] + b[p], -1), num_classes, rng), vy)
                                 for p in range(len(w))])

            search = search_C(np.stack([tx[i] for i in subsets_idx]), np.stack([ty[i] for i in subsets_idx]), score,
                              plain, num_classes=num_classes)
            models = [LinearModel(*search.solutions[p][search.best(p)], Standardizer.fit(tx[:1], False),
                                  search.best(p)) for p in range(len(subsets_idx))]
        else:
            models = [fit_layers(tx[i][:, None], ty[i], vx[:, :, None], vy, plain, num_classes=num_classes,
                                 rng=rng)[0].model for i in subsets_idx]
        accs = [evaluate_model(m, sx, sy, num_classes=num_classes, rng=rng)["accuracy"] for m in models]
        mean, sd = float(np.mean(accs)), float(np.std(accs))
        results.append({"budget": int(budget), "test_accuracies": accs, "mean_accuracy": mean, "std_accuracy": sd,
                        "mean_error_percent": 100 * (1 - mean), "std_error_percent": 100 * sd})
    return results


def format_percent(x: float | None) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"
