r"""Sampling throughput on this machine: key/value-cached decoding against recomputing the sequence per token.

The issue's case: 32 images of 32x32 (1024 tokens each) from a 4-layer, width-256, 8-head model with a 512-colour
vocabulary, float32, unconditional (from SOS), temperature 1.

  * cached:    `igpt_jax.models.decoding.generate`, one jitted call: a prefill of the SOS position, then a
               `lax.fori_loop` of one-token steps against the key/value cache (the model's own modules in
               decode mode, `IGPT(decode=True)`). Timed over whole images (all 1024 tokens of all 32 images).
  * recompute: `igpt_jax.models.decoding.generate_recompute`, the same loop and sampling but the full forward pass over
               all 1024 positions for every new token (the model's own attention, blockwise causal on CPU).
               Far too slow to finish an image here, so it is timed over ``--recompute_steps`` new tokens and
               reported as tokens per second, which does not depend on where in the sequence it stands.

Each is compiled ahead of time (compile time reported separately), run once untimed, then timed ``--repeats``
times; the best repeat is the figure (the machine is shared). Tokens/s counts new tokens of all images together.

Example:
  python bench/bench_sampling.py                      # the issue's case
  python bench/bench_sampling.py --batch=8 --repeats=1 --recompute_steps=2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from igpt_jax.models import decoding as sampling
from igpt_jax.models.igpt import ModelConfig, init_params


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images generated at once")
    p.add_argument("--resolution", type=int, default=32, help="image side; tokens per image = resolution**2")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--attention", default="auto", help="ModelConfig.attention of the recompute path")
    p.add_argument("--recompute_steps", type=int, default=4, help="new tokens per timed recompute call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip_recompute", action="store_true")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p.parse_args(argv)


def _time(fn, args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # untimed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    n = args.resolution**2
    cfg = ModelConfig(vocab_size=args.vocab, n_ctx=n, d_model=args.d_model, n_head=args.n_head,
                      n_layer=args.n_layer, remat="none", attention=args.attention)
    params = jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(jax.random.key(0))
    params["wtet"] = 0.2 * jax.random.normal(jax.random.key(1), params["wtet"].shape)  # not the zero init
    prefix = jnp.zeros((args.batch, 0), jnp.int32)
    rng = jax.random.key(0)
    print(f"{jax.default_backend()} ({os.cpu_count()} cores), jax {jax.__version__}; {args.batch} images of "
          f"{args.resolution}x{args.resolution} ({n} tokens), {args.n_layer} layers, width {args.d_model}, "
          f"{args.n_head} heads, vocabulary {args.vocab}, float32; load average {os.getloadavg()[0]:.1f}", flush=True)

    rows = []

    def bench(name, fn, new_tokens_per_call):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, prefix, rng).compile()
        compile_s = time.perf_counter() - start
        times = _time(compiled, (params, prefix, rng), args.repeats)
        best = min(times)
        row = {"path": name, "new_tokens_per_call": new_tokens_per_call, "best_s": best, "times_s": times,
               "tokens_per_s": new_tokens_per_call / best, "compile_s": compile_s}
        rows.append(row)
        print(f"  {name:<10} {row['tokens_per_s']:>10,.1f} tokens/s   ({new_tokens_per_call} tokens in "
              f"{best:.2f}s best of {[round(t, 2) for t in times]}; compile {compile_s:.1f}s)", flush=True)

    bench("cached", lambda p, x, r: sampling.generate(cfg, p, x, r, temperature=1.0), args.batch * n)
    if not args.skip_recompute:
        steps = args.recompute_steps
        bench("recompute", lambda p, x, r: sampling.generate_recompute(cfg, p, x, r, temperature=1.0,
                                                                       num_steps=steps), args.batch * steps)
        speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"  cached / recompute: {speedup:,.0f}x; {args.batch} images would take {args.batch * n / rows[0]['tokens_per_s']:.1f}s "
              f"cached, {args.batch * n / rows[1]['tokens_per_s'] / 3600:.1f} h recomputing", flush=True)
    result = {"args": vars(args), "backend": jax.default_backend(), "rows": rows, "load_average": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
