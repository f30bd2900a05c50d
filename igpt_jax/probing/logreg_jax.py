"""Multinomial L2 logistic regression fitted in JAX: scikit-learn's objective, several problems in one call.

The objective is scikit-learn's `LogisticRegression(penalty='l2', C)` for multinomial problems, divided by the
number of examples n (the same minimiser; scikit-learn minimises the same scaled form):

    f(W, b) = mean_i [ logsumexp(x_i W + b) - (x_i W + b)[y_i] ] + ||W||^2 / (2 C n)

with W [d, classes] (one column per class, the symmetric parametrisation), the intercept b [classes] not penalised.
It is minimised by full-batch L-BFGS (`optax.lbfgs`, zoom line search) until max |grad f| <= tol (scikit-learn's
`gtol`, default 1e-4) or ``max_iter`` iterations, from a warm start (the previous C's solution along a path).

Several independent problems (the layers of a model, the random subsets of a low-data budget) are solved in one
compiled call, one after the other (`jax.lax.map` over a leading axis: x [problems, n, d], one C per problem), so
each stops at its own convergence. Not `jax.vmap` by default: a batched while loop runs every problem until the
slowest converges, and under vmap the line search's and optax's reuse of the last evaluation (`lax.cond`) become
selects that evaluate both branches (bench/bench_logreg_batching.py measures both; bench/RESULTS.md "Linear
probe"). Classes absent from a problem's training labels get a fixed logit of -1e9 (never predicted; scikit-learn
drops them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

ABSENT_LOGIT = -1e9  # logit offset of classes absent from the training labels


def objective(w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array, C: jax.Array, offset: jax.Array) -> jax.Array:
    """f(W, b) above for one problem: w [d, k], b [k], x [n, d], y [n], C scalar, offset [k] (0 or ABSENT_LOGIT)."""
    logits = x @ w + b + offset  # [n, k]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return jnp.mean(nll) + jnp.sum(w * w) / (2.0 * C * x.shape[0])


def _solve_one(x, y, C, offset, w0, b0, *, max_iter: int, tol: float, memory: int):
    """L-BFGS on one problem from (w0, b0); returns (w, b, iterations, max |grad|)."""

    def value_fn(p):
        return objective(p["w"], p["b"], x, y, C, offset)

    opt = optax.lbfgs(memory_size=memory)
    value_and_grad = optax.value_and_grad_from_state(value_fn)
    params = {"w": w0, "b": b0}

    def grad_max(g):
        return jnp.maximum(jnp.max(jnp.abs(g["w"])), jnp.max(jnp.abs(g["b"])))

    def cond(carry):
        _, _, it, gmax = carry
        return (it < max_iter) & (gmax > tol)

    def body(carry):
        p, state, it, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=value_fn)
        p = optax.apply_updates(p, updates)
        return p, state, it + 1, grad_max(optax.tree.get(state, "grad"))

    g0 = jax.grad(value_fn)(params)
    carry = (params, opt.init(params), jnp.zeros((), jnp.int32), grad_max(g0))
    p, _, it, gmax = jax.lax.while_loop(cond, body, carry)
    return p["w"], p["b"], it, gmax


BATCHING = ("map", "vmap")  # how fit() runs several problems: one after the other (default), or vectorised


@functools.partial(jax.jit, static_argnames=("max_iter", "tol", "memory", "batching"))
def _solve_batched(x, y, C, offset, w0, b0, *, max_iter: int, tol: float, memory: int, batching: str = "map"):
    solve = functools.partial(_solve_one, max_iter=max_iter, tol=tol, memory=memory)
    if batching == "vmap":
        return jax.vmap(solve)(x, y, C, offset, w0, b0)
    return jax.lax.map(lambda args: solve(*args), (x, y, C, offset, w0, b0))


def class_offsets(y: np.ndarray, num_classes: int) -> np.ndarray:
    """[problems, k] logit offsets: 0 for classes present in each problem's labels y [problems, n], else -1e9."""
    present = np.zeros((y.shape[0], num_classes), bool)
    for p in range(y.shape[0]):
        present[p, np.unique(y[p])] = True
    return np.where(present, 0.0, ABSENT_LOGIT).astype(np.float32)


def fit(x: np.ndarray, y: np.ndarray, C: np.ndarray, *, num_classes: int,
        init: tuple[np.ndarray, np.ndarray] | None = None, max_iter: int = 1000, tol: float = 1e-4, memory: int = 10,
        batching: str = "map") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fits one logistic regression per problem.

    Args:
      x: [problems, n, d] features (standardised: the solver's tolerance is absolute).
      y: [problems, n] or [n] integer labels in [0, num_classes).
      C: [problems] (or a scalar) inverse L2 strengths.
      num_classes: number of classes k.
      init: warm start (w [problems, d, k], b [problems, k]); zeros by default.
      max_iter: L-BFGS iterations at most.
      tol: stop when max |grad f| <= tol.
      memory: L-BFGS history length.
      batching: 'map' (one problem after the other, each to its own convergence) or 'vmap' (all together until the
        slowest converges; bench/bench_logreg_batching.py compares them).

    Returns:
      (w [problems, d, k], b [problems, k], iterations [problems]) as numpy arrays; b is -inf for absent classes.
    """
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r}: expected one of {BATCHING}")
    x = np.asarray(x, np.float32)
    problems, n, d = x.shape
    y = np.broadcast_to(np.asarray(y, np.int32), (problems, n))
    C = np.broadcast_to(np.asarray(C, np.float32), (problems,))
    offset = class_offsets(y, num_classes)
    if init is None:
        w0, b0 = np.zeros((problems, d, num_classes), np.float32), np.zeros((problems, num_classes), np.float32)
    else:
        w0, b0 = np.asarray(init[0], np.float32), np.where(np.isfinite(init[1]), init[1], 0.0).astype(np.float32)
    w, b, it, _ = jax.device_get(_solve_batched(x, y, C, offset, w0, b0, max_iter=int(max_iter), tol=float(tol),
                                                memory=int(memory), batching=batching))
    b = np.where(offset < 0, -np.inf, b).astype(np.float32)
    return np.asarray(w, np.float32), b, np.asarray(it)
