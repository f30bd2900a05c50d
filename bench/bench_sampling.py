r"""Sampling throughput on this machine: key/value-cached decoding against recomputing the sequence per token.

The issue's case: 32 images of 32x32 (1024 tokens each) from a 4-layer, width-256, 8-head model with a 512-colour
vocabulary, float32, unconditional (from SOS), temperature 1.

  * cached:    `igpt_jax.models.decoding.generate`, one jitted call: a prefill of the SOS position, then a
               `lax.fori_loop` of one-token steps against the key/value cache (the model's own modules in
               decode mode, `IGPT(decode=True)`). Timed over whole images (all 1024 tokens of all 32 images).
  * hand-written (``--hand_written``): the peer. The decoder as it was written by hand before sampling ran the
               model's own modules (commit 605e450): the same computation spelled out with einsums on the split
               parameters, the same per-layer [batch, heads, n_ctx, head_dim] caches, the same fori_loop and
               sampling keys. Its tokens must equal `cached`'s (checked), so the ratio compares two spellings of
               one program. For each, the bench also counts the copies and transposes of a whole cache array inside
               the compiled loop body (what a decode step should never do: it moves the cache instead of reading it).
  * recompute: `igpt_jax.models.decoding.generate_recompute`, the same loop and sampling but the full forward pass over
               all 1024 positions for every new token (the model's own attention, blockwise causal on CPU).
               Far too slow to finish an image here, so it is timed over ``--recompute_steps`` new tokens and
               reported as tokens per second, which does not depend on where in the sequence it stands.

Each is compiled ahead of time (compile time reported separately), run once untimed, then timed ``--repeats``
times; the best repeat is the figure (the machine is shared). Tokens/s counts new tokens of all images together.

Example:
  python bench/bench_sampling.py                      # the issue's case
  python bench/bench_sampling.py --hand_written --skip_recompute --repeats=5   # against the hand-written peer
  python bench/bench_sampling.py --batch=8 --repeats=1 --recompute_steps=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from igpt_jax.models import decoding as sampling
from igpt_jax.models.igpt import Mlp, ModelConfig, RMSNorm, init_params, split_layers


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
    p.add_argument("--hand_written", action="store_true",
                   help="also time the hand-written decoder (the peer), alternating with the cached path")
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


def hand_written_generate(cfg: ModelConfig, params, prefix, rng):
    """Unconditional samples (prefix [batch, 0]) by the hand-written decoder of 605e450: see the module docstring."""
    p = split_layers(params)
    batch = prefix.shape[0]
    shape = (batch, cfg.n_head, cfg.n_ctx, cfg.head_dim)
    keys = tuple(jnp.zeros(shape) for _ in range(cfg.n_layer))
    values = tuple(jnp.zeros(shape) for _ in range(cfg.n_layer))

    def step(prev, position, keys, values):
        x = jnp.where(position == 0, p["sos"], jnp.take(p["wte"], prev, axis=0))
        x = (x + jax.lax.dynamic_index_in_dim(p["wpe"], position, keepdims=False))[:, None]  # [b, 1, d]
        allowed = jnp.arange(cfg.n_ctx) <= position
        keys, values = list(keys), list(values)
        for i in range(cfg.n_layer):
            block = p["blocks"][str(i)]
            h = RMSNorm(cfg).apply({"params": block["ln_1"]}, x)
            q, k, v = (jnp.einsum("btd,dhk->bthk", h, block["attn"][n]) for n in "qkv")
            keys[i] = jax.lax.dynamic_update_slice_in_dim(keys[i], jnp.swapaxes(k, 1, 2), position, axis=2)
            values[i] = jax.lax.dynamic_update_slice_in_dim(values[i], jnp.swapaxes(v, 1, 2), position, axis=2)
            q = jnp.swapaxes(q / math.sqrt(cfg.head_dim), 1, 2)  # [b, h, 1, k]
            scores = jnp.einsum("bhqd,bhnd->bhqn", q, keys[i])
            probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
            x = x + jnp.einsum("bthk,hkd->btd", jnp.einsum("bhqn,bhnd->bqhd", probs, values[i]), block["attn"]["o"])
            x = x + Mlp(cfg).apply({"params": block["mlp"]}, RMSNorm(cfg).apply({"params": block["ln_2"]}, x))
        h = RMSNorm(cfg).apply({"params": p["ln_f"]}, x)
        return jnp.einsum("btd,vd->btv", h, p["wtet"])[:, 0], tuple(keys), tuple(values)

    def body(position, carry):
        tokens, keys, values = carry
        prev = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(position - 1, 0), axis=1, keepdims=False)
        logits, keys, values = step(prev, position, keys, values)
        new = sampling.sample_logits(jax.random.fold_in(rng, position), logits, temperature=1.0, top_k=0)
        return jax.lax.dynamic_update_index_in_dim(tokens, new, position, axis=1), keys, values

    tokens = jnp.zeros((batch, cfg.n_ctx), jnp.int32)
    return jax.lax.fori_loop(0, cfg.n_ctx, body, (tokens, keys, values))[0]


def cache_moves_in_loop(hlo_text: str, cfg: ModelConfig, batch: int) -> int:
    """Copies and transposes of a whole layer's cache (batch x heads x n_ctx x head_dim elements) in the body of
    the compiled program's largest while loop: the decode loop (fusions counted by what they compute)."""
    size = batch * cfg.n_head * cfg.n_ctx * cfg.head_dim
    comps, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?(\S+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line.strip())
    body = max(re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo_text), key=lambda n: len(comps.get(n, [])))
    moves = 0
    for ins in comps[body]:
        m = re.match(r"(?:ROOT )?%?\S+ = \w+\[([\d,]*)\]\S* (\w[\w-]*)\((.*)", ins)
        if not m or math.prod(int(d) for d in m.group(1).split(",") if d) != size:
            continue
        inner = comps.get((re.search(r"calls=%?([\w.\-]+)", ins) or [None, ""])[1], [])
        ops = {op for line in inner for op in re.findall(r"= \S+ (\w[\w-]*)\(", line)}
        moves += m.group(2) in ("copy", "transpose") or (m.group(2) == "fusion" and bool(ops & {"copy", "transpose"}))
    return moves


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

    def compile_fn(fn):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, prefix, rng).compile()
        return compiled, time.perf_counter() - start

    def report(name, compiled, compile_s, times, new_tokens_per_call):
        best = min(times)
        row = {"path": name, "new_tokens_per_call": new_tokens_per_call, "best_s": best, "times_s": times,
               "tokens_per_s": new_tokens_per_call / best, "compile_s": compile_s}
        if name != "recompute":
            row["cache_moves_per_step"] = cache_moves_in_loop(compiled.as_text(), cfg, args.batch)
        rows.append(row)
        moves = f"; cache copies/transposes per step {row['cache_moves_per_step']}" if name != "recompute" else ""
        print(f"  {name:<12} {row['tokens_per_s']:>10,.1f} tokens/s   ({new_tokens_per_call} tokens in "
              f"{best:.2f}s best of {[round(t, 2) for t in times]}; compile {compile_s:.1f}s{moves})", flush=True)

    def bench(name, fn, new_tokens_per_call):
        compiled, compile_s = compile_fn(fn)
        report(name, compiled, compile_s, _time(compiled, (params, prefix, rng), args.repeats), new_tokens_per_call)

    def cached_fn(p, x, r):
        return sampling.generate(cfg, p, x, r, temperature=1.0)
    if args.hand_written:  # the two alternate, repeat by repeat, so that both see the same load
        pair = {"cached": compile_fn(cached_fn),
                "hand-written": compile_fn(lambda p, x, r: hand_written_generate(cfg, p, x, r))}
        outputs = {name: jax.block_until_ready(c(params, prefix, rng)) for name, (c, _) in pair.items()}  # untimed
        if not bool((outputs["cached"] == outputs["hand-written"]).all()):
            raise SystemExit("the hand-written decoder drew other tokens than the cached path: not the same program")
        times = {name: [] for name in pair}
        for _ in range(args.repeats):
            for name, (compiled, _) in pair.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, prefix, rng))
                times[name].append(time.perf_counter() - start)
        for name, (compiled, compile_s) in pair.items():
            report(name, compiled, compile_s, times[name], args.batch * n)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"  cached / hand-written: {rows[-1]['best_s'] / rows[-2]['best_s']:.3f}x (best), "
              f"{medians['hand-written'] / medians['cached']:.3f}x (median); the same tokens", flush=True)
    else:
        bench("cached", cached_fn, args.batch * n)
    if not args.skip_recompute:
        steps = args.recompute_steps
        bench("recompute", lambda p, x, r: sampling.generate_recompute(cfg, p, x, r, temperature=1.0,
                                                                       num_steps=steps), args.batch * steps)
        speedup = rows[0]["tokens_per_s"] / rows[-1]["tokens_per_s"]
        print(f"  cached / recompute: {speedup:,.0f}x; {args.batch} images would take "
              f"{args.batch * n / rows[0]['tokens_per_s']:.1f}s cached, "
              f"{args.batch * n / rows[-1]['tokens_per_s'] / 3600:.1f} h recomputing", flush=True)
    result = {"args": vars(args), "backend": jax.default_backend(), "rows": rows, "load_average": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
