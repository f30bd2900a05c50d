r"""Where the JAX L-BFGS probe solver overtakes scikit-learn's: the measurement behind ``probe.solver='auto'``.

For each problem size (problems x examples x features, 10 classes), fits the probe's C grid (`linear_probe.search_C`,
warm-started, no widening) once with scikit-learn's L-BFGS (one problem and one C at a time) and once with the JAX
solver (all problems in one compiled call), on the same standardised Gaussian features with labels from a noisy random
linear teacher (`make_problem`). The JAX time includes its compilation (each size is a new shape, as in a probe job:
the persistent compilation cache is off here), since that is what a probe pays; scikit-learn is imported before. Prints one row per size: both times, their ratio and
both training accuracies; then the smallest size (problems x n x d) from which the JAX solver was faster at every
larger size measured.

  nice -n 10 python bench/bench_solver_crossover.py            # the default grid of sizes
  nice -n 10 python bench/bench_solver_crossover.py --n=1000,4000 --d=64,512 --problems=1,8
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import numpy as np
import sklearn.linear_model  # noqa: F401  (imported before the first timing, as in a probe job)

from igpt_jax.probing import linear_probe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="1,4,8", help="comma-separated: problems fitted together (layers)")
    p.add_argument("--n", default="500,2000,8000", help="comma-separated: training examples")
    p.add_argument("--d", default="64,256,512", help="comma-separated: features")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--C", default="0.01,0.1,1", help="the C grid")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_problem(problems: int, n: int, d: int, classes: int, rng: np.random.Generator):
    """Features [problems, n, d] and labels [n]: every problem (a layer) is its own noisy view of one Gaussian
    signal, whose labels come from a noisy linear teacher (so no problem is separable, as real layers are not)."""
    signal = rng.standard_normal((n, d)).astype(np.float32)
    teacher = rng.standard_normal((d, classes)).astype(np.float32) / np.sqrt(d)
    labels = np.argmax(signal @ teacher * 3.0 + rng.gumbel(size=(n, classes)).astype(np.float32), axis=1)
    x = signal[None] + 0.5 * rng.standard_normal((problems, n, d)).astype(np.float32)
    return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True), labels


def time_search(solver: str, x: np.ndarray, y: np.ndarray, grid: tuple[float, ...], classes: int):
    settings = linear_probe.ProbeSettings(solver=solver, C=grid, C_widen=0)

    def score(w, b):
        return np.array([np.mean(np.argmax(x[p] @ w[p] + b[p], axis=1) == y) for p in range(x.shape[0])])

    t0 = time.perf_counter()
    search = linear_probe.search_C(x, y, score, settings, num_classes=classes)
    seconds = time.perf_counter() - t0
    return seconds, float(np.mean([max(a.values()) for a in search.accuracies]))


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # every size compiles, as in a probe job
    grid = tuple(float(c) for c in args.C.split(","))
    sizes = list(itertools.product(*(sorted(int(v) for v in s.split(",")) for s in (args.problems, args.n, args.d))))
    rng = np.random.default_rng(args.seed)
    print(f"load average before: {os.getloadavg()[0]:.1f}; C grid {grid}; {args.classes} classes")
    print(f"{'problems':>8} {'n':>6} {'d':>5} {'p*n*d':>11} {'sklearn s':>10} {'jax s':>8} {'sk/jax':>7} "
          f"{'acc sk':>7} {'acc jax':>7}")
    rows = []
    for problems, n, d in sizes:
        x, y = make_problem(problems, n, d, args.classes, rng)
        sk, acc_sk = time_search("lbfgs", x, y, grid, args.classes)
        jx, acc_jx = time_search("jax_lbfgs", x, y, grid, args.classes)
        rows.append((problems * n * d, sk / jx))
        print(f"{problems:>8} {n:>6} {d:>5} {problems * n * d:>11,} {sk:>10.2f} {jx:>8.2f} {sk / jx:>7.2f} "
              f"{acc_sk:>7.3f} {acc_jx:>7.3f}", flush=True)
    sizes_measured = sorted({w for w, _ in rows})
    faster_from = next((w for w in sizes_measured if all(r > 1 for v, r in rows if v >= w)), None)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"JAX faster at every size from problems*n*d = {faster_from:,}" if faster_from else
          "JAX was not faster at the largest sizes measured")


if __name__ == "__main__":
    main()
