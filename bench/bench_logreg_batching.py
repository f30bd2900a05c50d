r"""The JAX probe solver's two ways of running several problems: `jax.lax.map` (default) against `jax.vmap`.

Fits the same problems (every layer of saved probe features, or random features) both ways, twice each: a fixed
number of L-BFGS iterations (``tol=0``: the cost of one iteration), then to convergence at one C from zero (what
the probe does; the vmapped loop runs until its slowest problem converges). Times exclude compilation (each is run
once before it is timed). Prints a table with the ratio against vmap and the largest difference between the two
ways' validation-free training accuracies (they solve the same problems).

Example (the features that the probe job of configs/vqvae_cifar10.py saved: 9 layers x 45,000 x 128):
  python bench/bench_logreg_batching.py \
      --features=workdirs/vqvae_cifar10/probe/progress/features-step2000-train.npz --C=0.1
Without --features: random Gaussian features with labels from a random linear teacher (--problems, --n, --d).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from igpt_jax.probing import logreg_jax


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="", help="a probe job's progress/features-*-train.npz (all its layers)")
    p.add_argument("--problems", type=int, default=9, help="random features: problems")
    p.add_argument("--n", type=int, default=20000, help="random features: examples")
    p.add_argument("--d", type=int, default=128, help="random features: dimensions")
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    p.add_argument("--iters", type=int, default=50, help="iterations of the fixed-iteration row")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """Standardised features [problems, n, d], labels [n], and a description."""
    if args.features:
        z = np.load(args.features)
        x = np.ascontiguousarray(z["features"][0].transpose(1, 0, 2))  # [n, layers, d] -> [layers, n, d]
        y = z["labels"]
        what = f"{args.features}: {x.shape[0]} layers x {x.shape[1]:,} x {x.shape[2]}"
    else:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.problems, args.n, args.d)).astype(np.float32)
        y = np.argmax(x[0] @ rng.standard_normal((args.d, 10)) + rng.standard_normal((args.n, 10)) * 3, -1)
        what = f"random: {args.problems} problems x {args.n:,} x {args.d}"
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
    return x.astype(np.float32), np.asarray(y, np.int32), what


def timed_fit(x, y, C, batching: str, **kw) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds of one fit (after a first, compiling call), iterations per problem, training accuracy per problem."""
    logreg_jax.fit(x, y, C, num_classes=10, batching=batching, **kw)
    t = time.time()
    w, b, it = logreg_jax.fit(x, y, C, num_classes=10, batching=batching, **kw)
    seconds = time.time() - t
    acc = np.array([np.mean(np.argmax(x[p] @ w[p] + b[p], -1) == y) for p in range(x.shape[0])])
    return seconds, it, acc


def main(argv=None) -> None:
    args = parse_args(argv)
    x, y, what = load(args)
    C = np.full(x.shape[0], args.C, np.float32)
    print(f"{what}; C={args.C}; {jax.device_count()} {jax.default_backend()} device(s)")
    rows = []
    for name, kw in ((f"{args.iters} iterations each", dict(max_iter=args.iters, tol=0.0)),
                     ("to convergence (tol 1e-4) from zero", {})):
        out = {b: timed_fit(x, y, C, b, **kw) for b in ("vmap", "map")}
        diff = np.max(np.abs(out["vmap"][2] - out["map"][2])) * 100
        for b in ("vmap", "map"):
            s, it, _ = out[b]
            rows.append((name, b, f"{s:.2f}", f"{int(it.sum()):,} (max {int(it.max())})",
                         f"{out['vmap'][0] / s:.2f}x", f"{diff:.2f}"))
    cols = ("run", "batching", "seconds", "iterations (sum)", "speed vs vmap", "max train-accuracy diff (points)")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
