r"""Train-step throughput on CPU: forward + backward + Adam, float32, tokens per second.

The issue's benchmark case: 4 layers, width 256, 8 heads, sequence 1024 (32x32), vocabulary 512, batch 8.
For every combination of ``--attention`` x ``--block`` x ``--remat`` x ``--scan_unroll`` it builds the model
(`igpt_jax.models.igpt.init_params`), compiles one jitted, buffer-donating step (`lm_loss` gradients +
`optax.adam(lr, b1=0.9, b2=0.95)`), runs ``--warmup`` untimed steps, then ``--repeats`` timings of ``--steps``
steps each (each step waits for its loss with `block_until_ready`), and prints one table row with the best
repeat. The machine may be shared: every row also says how much CPU other processes used while it was timed
(from /proc/stat minus this process's own time), and the slowest repeat relative to the best.

Process-level settings (they must be in place before the process starts or jax is imported), so every entry of
``--env`` runs the JAX measurements in its own child process:
  * XLA_FLAGS: ``--xla_flags`` (default `DEFAULT_XLA_FLAGS`, XLA's own defaults);
  * the glibc allocator: ``--malloc=hugetlb`` (default) runs with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``:
    malloc then asks for transparent huge pages for its large blocks, so the hundreds of MB of fresh buffers
    each XLA:CPU step allocates are not page-faulted in 4 KiB at a time (~770,000 faults and ~1.5 s of system
    time per step with the default allocator; see bench/RESULTS.md). ``--malloc=default`` leaves glibc alone.
  * JAX_PLATFORMS=cpu (an installed libtpu would otherwise be probed).

``--hf`` also times the Hugging Face port (`ImageGPTForCausalImageModeling`, eager attention, dropout 0,
`torch.optim.Adam`, ``--torch_threads`` threads) on the same step, in a child with the same allocator setting;
``--torch_gpt`` a plain PyTorch decoder of the same shape with `scaled_dot_product_attention` (the issue's
other reference figure). ``--hf_only`` skips the JAX rows.

``--profile`` also profiles ``--steps`` steps of every JAX row (`jax.profiler`, XLA:CPU's per-thunk events) and of
the torch GPT (`torch.profiler`) after their timings, and prints where a step's time goes: each compiled op's
time mapped to its HLO instruction and JAX source (``op_name``), summed by part of the model (attention core,
attention projections, MLP, norms, logits and loss, optimizer), forward or backward, and matmul or not; then the
slowest ops with their shapes. Thread-pool events overlap, so the parts add up to the threads' busy time, not the
wall time.

Examples:
  python bench/bench_train_step.py --hf                         # library defaults for this case, plus HF
  python bench/bench_train_step.py --attention=blockwise,dense,xla --remat=none,full
  python bench/bench_train_step.py --block=64,128,256 --malloc=hugetlb,default
  python bench/bench_train_step.py --xla_flags="|--xla_cpu_enable_fast_math=true"   # '|' separates settings
  python bench/bench_train_step.py --remat=none --torch_gpt --profile   # where each step's time goes
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA_FLAGS used unless --xla_flags says otherwise: none measured worth setting (bench/RESULTS.md).
DEFAULT_XLA_FLAGS = ""
MALLOC_SETTINGS = {"hugetlb": "glibc.malloc.hugetlb=1", "default": None}


def _csv(kind):
    def parse(text: str):
        return [kind(item.strip()) for item in text.split(",") if item.strip()]

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", type=_csv(str), default=["auto"],
                   help="comma list of ModelConfig.attention values (default: auto, the library's choice)")
    p.add_argument("--block", type=_csv(int), default=[0],
                   help="comma list of attention_block values (0: the ModelConfig default)")
    p.add_argument("--remat", type=_csv(str), default=["default"],
                   help="comma list of remat policies (default: the ModelConfig default)")
    p.add_argument("--scan_unroll", type=_csv(int), default=[0],
                   help="comma list of nn.scan unroll factors (0: ModelConfig's default, the whole stack on CPU)")
    p.add_argument("--objective", default="ar", choices=["ar", "bert"])
    p.add_argument("--save_weights", type=_csv(str), default=["default"],
                   help="comma list for blockwise attention's save_weights: default, true (keep the softmax "
                        "weights for the backward pass) or false (recompute them)")
    p.add_argument("--xla_flags", default=None,
                   help="'|'-separated XLA_FLAGS settings, each in its own child process (default: DEFAULT_XLA_FLAGS)")
    p.add_argument("--malloc", type=_csv(str), default=["hugetlb"],
                   help=f"comma list of glibc allocator settings, each in its own child: {sorted(MALLOC_SETTINGS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=4, help="timed repeats; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--max_others", type=float, default=0.25,
                   help="a repeat counts only if other processes used at most this many CPUs meanwhile")
    p.add_argument("--retries", type=int, default=3, help="re-timings of a row that got no such repeat")
    p.add_argument("--hf", action="store_true", help="also time the Hugging Face PyTorch port")
    p.add_argument("--hf_only", action="store_true", help="time only the PyTorch reference(s), not JAX")
    p.add_argument("--torch_gpt", action="store_true",
                   help="also time a plain PyTorch GPT of the same shape with scaled_dot_product_attention")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also profile the JAX rows and the torch GPT")
    p.add_argument("--json", default=None, help="append one JSON line per result to this file")
    p.add_argument("--_child", choices=["jax", "hf", "torch_gpt"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


COLUMNS = (("implementation", 20), ("remat", 6), ("unroll", 6), ("XLA flags / threads", 30), ("malloc", 8),
           ("compile s", 9), ("step s", 7), ("spread", 6), ("others", 6), ("tokens/s", 8))
HEADER = " ".join(f"{name:<{w}}" for name, w in COLUMNS)


def format_row(r: dict) -> str:
    values = (r["implementation"], r["remat"], str(r["unroll"]), r["flags"] or "(none)", r["malloc"],
              f"{r['compile_s']:.1f}", f"{r['step_s']:.3f}", f"+{100 * (r['step_worst_s'] / r['step_s'] - 1):.0f}%",
              f"{r['others_cpus']:.2f}", f"{r['tokens_per_s']:,.0f}")
    return " ".join(f"{v:<{w}}" for v, (_, w) in zip(values, COLUMNS))


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy (from /proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_steps(run_one, steps: int, repeats: int, max_others: float = float("inf"), retries: int = 0,
               retry_wait_s: float = 30.0) -> dict:
    """Seconds per step over ``repeats`` timings of ``steps`` steps, and other processes' CPU use during each.

    The figure is the best repeat among those during which other processes used at most ``max_others`` CPUs on
    average; when none qualifies, the whole set is timed again after ``retry_wait_s`` (at most ``retries``
    times), and failing that the best repeat overall is reported (its 'others' column then shows the load).
    """
    reps = []
    for attempt in range(retries + 1):
        for _ in range(repeats):
            busy0, own0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
            for _ in range(steps):
                run_one()
            wall = time.perf_counter() - t0
            others = max(0.0, (_busy_cpu_seconds() - busy0) - (_own_cpu_seconds() - own0)) / wall
            others = min(others, float(os.cpu_count() or 1))  # /proc/stat ticks are coarse for short repeats
            reps.append((wall / steps, others, (_own_cpu_seconds() - own0) / steps))
        if any(r[1] <= max_others for r in reps) or attempt == retries:
            break
        print(f"  (other processes used {min(r[1] for r in reps):.2f}+ CPUs; timing again in {retry_wait_s:.0f} s)",
              file=sys.stderr, flush=True)
        time.sleep(retry_wait_s)
    clean = [r for r in reps if r[1] <= max_others] or reps
    best = min(clean)
    return dict(step_s=best[0], step_worst_s=max(r[0] for r in clean), step_median_s=statistics.median(r[0] for r in clean),
                others_cpus=best[1], own_cpu_s_per_step=best[2], all_step_s=[r[0] for r in reps],
                all_others_cpus=[r[1] for r in reps], repeats=len(reps))


def bench_jax(args: argparse.Namespace) -> list[dict]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from igpt_jax.models import attention as attention_lib
    from igpt_jax.models.igpt import ModelConfig, init_params, scan_unroll_for
    from igpt_jax.models.objectives import lm_loss

    base = ModelConfig(vocab_size=args.vocab, n_ctx=args.seq, d_model=args.width, n_head=args.heads,
                       n_layer=args.layers, objective=args.objective, dropout=0.0)
    results = []
    blockwise_attention = attention_lib.blockwise_attention
    for impl, block, remat, unroll, save in itertools.product(
        args.attention, args.block, args.remat, args.scan_unroll, args.save_weights
    ):
        if save != "default":  # the model calls attention_lib.blockwise_attention without this argument
            attention_lib.blockwise_attention = functools.partial(blockwise_attention, save_weights=save == "true")
        cfg = base.replace(attention=impl, scan_unroll=unroll)
        if block:
            cfg = cfg.replace(attention_block=block)
        if remat != "default":
            cfg = cfg.replace(remat=remat)
        resolved = attention_lib.resolve_implementation(
            cfg.attention, causal=cfg.causal, length=args.seq, block_size=cfg.attention_block, dtype=jnp.float32)
        label = resolved + (f"/{min(cfg.attention_block, args.seq)}" if resolved == "blockwise" else "")
        if save != "default" and resolved == "blockwise":
            label += " save" if save == "true" else " recomp"
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
        state = [params, opt_state, None]

        def run_one(state=state, compiled=compiled, tokens=tokens, rng=rng):
            state[0], state[1], state[2] = compiled(state[0], state[1], tokens, rng)
            state[2].block_until_ready()

        for _ in range(args.warmup):
            run_one()
        if not bool(jnp.isfinite(state[2])):
            raise RuntimeError(f"{label}: non-finite loss {state[2]}")
        timing = time_steps(run_one, args.steps, args.repeats, args.max_others, args.retries)
        if args.profile:
            timing["profile"] = profile_jax(run_one, compiled.as_text(), args.steps)
        shown_unroll = unroll or f"auto={scan_unroll_for(cfg)}"
        results.append(dict(implementation=label, remat=cfg.remat, unroll=shown_unroll, objective=args.objective,
                            flags=os.environ.get("XLA_FLAGS", ""), compile_s=compile_s,
                            tokens_per_s=args.batch * args.seq / timing["step_s"], **timing))
        del compiled, state
        attention_lib.blockwise_attention = blockwise_attention
    return results


# Parts of the model, from the JAX source path XLA keeps in each instruction's metadata (op_name).
_ATTENTION_CORE = ("bhkd,", "bhkq,", "bhdk,", "bhqk,", "bqhd,", "reduce_max", "exp", "softmax", "select_n")


def _model_part(op_name: str) -> str:
    if "/attn/" in op_name:
        return "attention core" if any(k in op_name for k in _ATTENTION_CORE) else "attention projections"
    if "/mlp/" in op_name:
        return "mlp"
    if "ln_" in op_name or "RMSNorm" in op_name:
        return "norms"
    if any(k in op_name for k in ("btd,vd", "log_softmax", "take_along_axis", "lm_loss", "ln_f")):
        return "logits and loss"
    if "IGPT" in op_name:
        return "embeddings, residuals"
    return "optimizer and the rest" if op_name else "unattributed (copies, broadcasts)"


def _hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {op, shape, op_name, matmul}} for every instruction of a compiled module's HLO text."""
    bodies, current, out = {}, None, {}
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?(\S+) .*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
    for lines in bodies.values():
        for line in lines:
            m = re.match(r"\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", line)
            if not m:
                continue
            op_name = re.search(r'op_name="([^"]*)"', line)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            inner = " ".join(bodies.get(called.group(1), [])) if called else ""
            out[m.group(1)] = {"op": m.group(3), "shape": m.group(2), "op_name": op_name.group(1) if op_name else "",
                               "matmul": m.group(3) == "dot" or " dot(" in inner}
    return out


def profile_jax(run_one, hlo_text: str, steps: int) -> dict:
    """Per-step milliseconds of every compiled op over ``steps`` steps under `jax.profiler`, grouped (see the module
    docstring): {"parts": {(part, direction, kind): ms}, "top": [(ms, op, shape, op_name), ...], "busy_ms": ...}."""
    import glob
    import shutil

    import jax

    instructions = _hlo_instructions(hlo_text)
    folder = tempfile.mkdtemp(prefix="bench_profile_")
    try:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                run_one()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_op = {}
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if event.name in instructions:
                    per_op[event.name] = per_op.get(event.name, 0.0) + event.duration_ns / 1e6 / steps
    parts = {}
    for name, ms in per_op.items():
        ins = instructions[name]
        key = " | ".join((_model_part(ins["op_name"]), "backward" if "transpose(" in ins["op_name"] else "forward",
                          "matmul" if ins["matmul"] else "other"))
        parts[key] = parts.get(key, 0.0) + ms
    top = sorted(((ms, instructions[n]["op"], instructions[n]["shape"], instructions[n]["op_name"])
                  for n, ms in per_op.items()), reverse=True)[:12]
    return {"parts": dict(sorted(parts.items(), key=lambda kv: -kv[1])), "top": top, "busy_ms": sum(per_op.values())}


def profile_torch(run_one, steps: int) -> dict:
    """Per-step milliseconds of the torch step's operators (self CPU time, `torch.profiler`), the slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_one()
    ops = sorted(((e.self_cpu_time_total / 1e3 / steps, e.key, e.count // steps) for e in prof.key_averages()),
                 reverse=True)
    return {"top": ops[:14], "busy_ms": sum(ms for ms, _, _ in ops)}


def print_profile(r: dict) -> None:
    prof = r["profile"]
    print(f"\nprofile of {r['implementation']} (remat {r['remat']}): per step {1e3 * r['step_s']:.0f} ms wall, "
          f"{prof['busy_ms']:.0f} ms in ops (all threads)")
    for key, ms in list(prof.get("parts", {}).items())[:16]:
        print(f"  {ms:8.1f} ms {100 * ms / prof['busy_ms']:5.1f} %  {key}")
    print("  slowest ops:")
    for row in prof["top"]:
        ms, rest = row[0], row[1:]
        print(f"  {ms:8.1f} ms  " + "  ".join(str(v) for v in rest)[:150])


def bench_hf(args: argparse.Namespace) -> list[dict]:
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

    t0 = time.perf_counter()
    run_one()  # the first step (lazy initialisation), reported in the compile column
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        run_one()
    timing = time_steps(run_one, args.steps, args.repeats, args.max_others, args.retries)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return [dict(implementation=f"HF ImageGPT ({impl})", remat="-", unroll="-", objective="ar",
                 flags=f"torch {torch.__version__}, {args.torch_threads} threads", compile_s=first_s,
                 tokens_per_s=args.batch * args.seq / timing["step_s"], **timing)]


def bench_torch_gpt(args: argparse.Namespace) -> list[dict]:
    """A plain PyTorch iGPT-shaped decoder (RMS norm, no biases, quick GELU, untied head) with
    `F.scaled_dot_product_attention(is_causal=True)`: the reference the issue quotes (~3,300 tokens/s)."""
    import torch
    import torch.nn.functional as F
    from torch import nn as tnn

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    d, h = args.width, args.heads

    class Norm(tnn.Module):
        def __init__(self):
            super().__init__()
            self.g = tnn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = Norm(), Norm()
            self.qkv, self.o = tnn.Linear(d, 3 * d, bias=False), tnn.Linear(d, d, bias=False)
            self.fc, self.proj = tnn.Linear(d, 4 * d, bias=False), tnn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.o(a)
            m = self.fc(self.ln_2(x))
            return x + self.proj(m * torch.sigmoid(1.702 * m))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(args.vocab, d), tnn.Embedding(args.seq, d)
            self.sos = tnn.Parameter(torch.zeros(d))
            self.blocks = tnn.ModuleList(Block() for _ in range(args.layers))
            self.ln_f, self.head = Norm(), tnn.Linear(d, args.vocab, bias=False)

        def forward(self, ids):
            b, t = ids.shape
            x = torch.cat([self.sos.expand(b, 1, d), self.wte(ids[:, :-1])], 1) + self.wpe.weight[:t]
            for blk in self.blocks:
                x = blk(x)
            return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), ids.flatten())

    model = GPT()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    def run_one():
        opt.zero_grad(set_to_none=True)
        model(ids).backward()
        opt.step()

    t0 = time.perf_counter()
    run_one()
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        run_one()
    timing = time_steps(run_one, args.steps, args.repeats, args.max_others, args.retries)
    if args.profile:
        timing["profile"] = profile_torch(run_one, args.steps)
    return [dict(implementation="torch GPT (sdpa)", remat="-", unroll="-", objective="ar",
                 flags=f"torch {torch.__version__}, {args.torch_threads} threads", compile_s=first_s,
                 tokens_per_s=args.batch * args.seq / timing["step_s"], **timing)]


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options in ``names`` (either --name=value or --name value) and bare flags --hf/--hf_only."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a.split("=")[0] in names or a in ("--hf", "--hf_only", "--torch_gpt"):
            continue
        else:
            out.append(a)
    return out


def run_child(argv: list[str], kind: str, flags: str, malloc: str) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), XLA_FLAGS=flags)
    env.pop("GLIBC_TUNABLES", None)
    if MALLOC_SETTINGS[malloc]:
        env["GLIBC_TUNABLES"] = MALLOC_SETTINGS[malloc]
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, os.path.abspath(__file__), *_strip(argv, ("--xla_flags", "--malloc", "--json")),
               f"--_child={kind}", f"--_out={out.name}", f"--malloc={malloc}"]
        subprocess.run(cmd, check=True, env=env)
        results = [json.loads(line) for line in out.read().splitlines() if line.strip()]
    for r in results:
        r["malloc"] = malloc
        print(format_row(r), flush=True)
    return results


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._child:
        results = {"jax": bench_jax, "hf": bench_hf, "torch_gpt": bench_torch_gpt}[args._child](args)
        with open(args._out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        return
    for m in args.malloc:
        if m not in MALLOC_SETTINGS:
            raise SystemExit(f"--malloc={m!r}: expected one of {sorted(MALLOC_SETTINGS)}")
    flag_sets = [DEFAULT_XLA_FLAGS] if args.xla_flags is None else [f.strip() for f in args.xla_flags.split("|")]
    print(f"train step, float32, {args.objective}: batch {args.batch}, sequence {args.seq}, width {args.width}, "
          f"{args.heads} heads, {args.layers} layers, vocabulary {args.vocab}; best of {args.repeats} x {args.steps} "
          f"steps; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print("spread: slowest counted repeat vs best; others: CPUs used by other processes while the best repeat ran "
          f"(repeats with more than {args.max_others} are not counted unless all are)")
    print(HEADER, flush=True)
    results = []
    if not args.hf_only:
        for malloc, flags in itertools.product(args.malloc, flag_sets):
            results += run_child(argv, "jax", flags, malloc)
    if args.hf or (args.hf_only and not args.torch_gpt):
        results += run_child(argv, "hf", "", args.malloc[0])
    if args.torch_gpt:
        results += run_child(argv, "torch_gpt", "", args.malloc[0])
    for r in results:
        if "profile" in r:
            print_profile(r)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(dict(r, load_average=os.getloadavg()[0])) + "\n" for r in results)


if __name__ == "__main__":
    main()
