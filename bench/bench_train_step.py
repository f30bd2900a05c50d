r"""Train-step throughput on this machine: forward + backward + Adam, float32.

The issue's benchmark case: 4 layers, width 256, 8 heads, sequence 1024 (32x32), vocabulary 512, batch 8.
For every combination of ``--attention`` x ``--block`` x ``--remat`` x ``--scan_unroll`` it builds the model,
compiles one jitted, buffer-donating step (`lm_loss` gradients + `optax.adam(lr, b1=0.9, b2=0.95)`), runs
``--warmup`` untimed steps, then ``--repeats`` timings of ``--steps`` steps each, and prints a table with the
best repeat (the spread across repeats is printed too: the machine is shared, so read the best as the figure).

XLA flags are process-wide and must be set before jax is imported, so each entry of ``--xla_flags`` (entries
separated by ';') runs in its own child process. The default entry is `DEFAULT_XLA_FLAGS`, the CPU flags that
measured fastest here (see bench/RESULTS.md); pass ``--xla_flags=''`` for XLA's own defaults.

``--hf`` also times the Hugging Face port (`ImageGPTForCausalImageModeling`, dropout 0, `torch.optim.Adam`,
eager attention, 2 torch threads) on the same step for the side-by-side figure.

Examples:
  python bench/bench_train_step.py                                    # the library defaults for this case
  python bench/bench_train_step.py --attention=blockwise,dense,xla --remat=none,full --hf
  python bench/bench_train_step.py --xla_flags="; --xla_cpu_enable_fast_math=true"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

# Set by the bench (before jax is imported) unless --xla_flags says otherwise. See bench/RESULTS.md.
DEFAULT_XLA_FLAGS = ""


def _csv(kind):
    def parse(text: str):
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", type=_csv(str), default=["auto"], help="comma list of ModelConfig.attention")
    p.add_argument("--block", type=_csv(int), default=[0], help="comma list of attention_block (0: config default)")
    p.add_argument("--remat", type=_csv(str), default=["default"],
                   help="comma list of remat policies ('default': ModelConfig's default)")
    p.add_argument("--scan_unroll", type=_csv(int), default=[1], help="comma list of nn.scan unroll factors")
    p.add_argument("--xla_flags", default=None,
                   help="';'-separated XLA_FLAGS settings, one child process each (default: DEFAULT_XLA_FLAGS)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--hf", action="store_true", help="also time the Hugging Face PyTorch port")
    p.add_argument("--hf_only", action="store_true", help="time only the Hugging Face port")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--json", default=None, help="append one JSON line per result to this file")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


HEADER = f"{'implementation':<22} {'remat':<8} {'unroll':>6} {'XLA flags':<44} {'compile s':>9} {'step s':>14} {'tokens/s':>9}"


def format_row(r: dict) -> str:
    spread = f"{r['step_s']:.3f}" + (f" (+{100 * (r['step_worst_s'] / r['step_s'] - 1):.0f}%)" if r["repeats"] > 1 else "")
    flags = r["xla_flags"] or "(XLA defaults)"
    return (f"{r['implementation']:<22} {r['remat']:<8} {str(r['unroll']):>6} {flags:<44} "
            f"{r['compile_s']:>9.1f} {spread:>14} {r['tokens_per_s']:>9,.0f}")


def _time_steps(run_one, steps: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            run_one()
        times.append((time.perf_counter() - t0) / steps)
    return times


def bench_jax(args: argparse.Namespace) -> list[dict]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from igpt_jax import attention as attention_lib
    from igpt_jax.model import ModelConfig, init_params
    from igpt_jax.objectives import lm_loss

    base = ModelConfig(vocab_size=args.vocab, n_ctx=args.seq, d_model=args.width, n_head=args.heads,
                       n_layer=args.layers)
    results = []
    for impl, block, remat, unroll in itertools.product(args.attention, args.block, args.remat, args.scan_unroll):
        cfg = base.replace(attention=impl, scan_unroll=unroll)
        if block:
            cfg = cfg.replace(attention_block=block)
        if remat != "default":
            cfg = cfg.replace(remat=remat)
        resolved = attention_lib.resolve_implementation(
            cfg.attention, causal=cfg.causal, length=args.seq, block_size=cfg.attention_block, dtype=jnp.float32)
        label = resolved + (f"/{cfg.attention_block}" if resolved.startswith("blockwise") else "")
        if impl == "auto":
            label = f"auto={label}"

        params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
        opt = optax.adam(args.lr, b1=0.9, b2=0.95)
        opt_state = opt.init(params)
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab, jnp.int32)
        rng = jax.random.key(2)

        def step(params, opt_state, tokens, rng, cfg=cfg, opt=opt):
            (loss, _), grads = jax.value_and_grad(lambda p: lm_loss(cfg, p, tokens, rng), has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, rng).compile()
        compile_s = time.perf_counter() - t0
        state = [params, opt_state]

        def run_one():
            state[0], state[1], loss = compiled(state[0], state[1], tokens, rng)
            loss.block_until_ready()
            return loss

        for _ in range(args.warmup):
            loss = run_one()
        if not bool(jnp.isfinite(loss)):
            raise RuntimeError(f"{label}: non-finite loss {loss}")
        times = _time_steps(run_one, args.steps, args.repeats)
        results.append(dict(
            implementation=label, remat=cfg.remat, unroll=unroll, xla_flags=os.environ.get("XLA_FLAGS", ""),
            compile_s=compile_s, step_s=min(times), step_worst_s=max(times),
            step_median_s=statistics.median(times), repeats=len(times),
            tokens_per_s=args.batch * args.seq / min(times), all_step_s=times))
        print(format_row(results[-1]), flush=True)
        del compiled, state
    return results


def bench_hf(args: argparse.Namespace) -> dict:
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    # HF's ImageGPT vocabulary is the palette plus the start-of-sequence token.
    config = ImageGPTConfig(vocab_size=args.vocab + 1, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ImageGPTForCausalImageModeling(config).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    def run_one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    run_one()  # first step (allocations, lazy init), reported like the JAX compile
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        run_one()
    times = _time_steps(run_one, args.steps, args.repeats)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    result = dict(
        implementation=f"HF ImageGPT ({impl})", remat="-", unroll="-", xla_flags=f"torch threads={args.torch_threads}",
        compile_s=first_s, step_s=min(times), step_worst_s=max(times), step_median_s=statistics.median(times),
        repeats=len(times), tokens_per_s=args.batch * args.seq / min(times), all_step_s=times)
    print(format_row(result), flush=True)
    return result


def _child_argv(argv: list[str], flags: str) -> list[str]:
    """This script's command line for one XLA-flags setting (without --xla_flags / --hf)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--xla_flags":
            skip = True  # its value follows
        elif not (a.startswith("--xla_flags=") or a == "--hf"):
            out.append(a)
    return [sys.executable, os.path.abspath(__file__), *out, "--_child", f"--xla_flags={flags}"]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    flag_sets = [DEFAULT_XLA_FLAGS] if args.xla_flags is None else [f.strip() for f in args.xla_flags.split(";")]
    if not args._child:
        print(f"batch {args.batch}, sequence {args.seq}, width {args.width}, {args.heads} heads, {args.layers} layers, "
              f"vocabulary {args.vocab}; float32; best of {args.repeats} x {args.steps} steps "
              f"(+x%: slowest repeat vs best); load average {os.getloadavg()[0]:.2f}")
        print(HEADER)
    results = []
    if args._child or (len(flag_sets) == 1 and not args.hf_only):
        if not args._child:
            os.environ["XLA_FLAGS"] = flag_sets[0]
        if not args.hf_only:
            results += bench_jax(args)
    elif not args.hf_only:
        for flags in flag_sets:
            subprocess.run(_child_argv(argv, flags), check=True)
    if (args.hf or args.hf_only) and not args._child:
        results.append(bench_hf(args))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    # Keep the repository root importable when run as a script.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
