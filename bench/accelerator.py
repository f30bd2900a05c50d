r"""One command that measures igpt_jax on whatever accelerator is present, against the Hugging Face port.

    python bench/accelerator.py                       # iGPT-S on the accelerator; writes accelerator.json
    python bench/accelerator.py --size=tiny --out=/tmp/a.json    # seconds on a CPU (the test runs this)

What it measures, on ``jax.devices()`` (all local devices, or the first ``--devices``; data-parallel: the batch over
the 'data' mesh axis):

* the train step of iGPT-S (24 x 512, 8 heads, 32x32 = 1,024 tokens, vocabulary 512; bfloat16 compute, float32
  parameters and Adam) as the pretraining job runs it (`igpt_jax.training.step.jitted_train_step`), for every
  attention that applies on the platform (XLA 'dense' everywhere; cuDNN flash 'cudnn' on GPU; Pallas 'splash' on
  TPU; on CPU 'blockwise') and remat 'none' and 'dots'; the batch is the largest that fits (``--batch=0``: from one
  probe compile per remat policy at a small batch, XLA's `memory_analysis()` per example against the device's
  ``bytes_limit``, halved again if the step then fails), a power of two times the device count. Per row: tokens/s,
  step time, TFLOP/s per device and MFU (`igpt_jax.training.mfu`: model FLOPs, causal attention counted once; the
  device's dense bf16 peak), compile seconds and memory (XLA's plan of the compiled step; the device's running
  peak where it reports one);
* cached sampling (`igpt_jax.models.decoding.generate`: whole 1,024-token images from SOS) at batch 64 and 1, and
  the prefill of 1,023 given tokens at batch 64, in tokens/s;
* the Hugging Face port, `ImageGPTForCausalImageModeling` (the `torch`/`transformers` of the ``test`` extra),
  same shapes on the same device when torch can reach it (CUDA, or the CPU), bfloat16 autocast with float32
  parameters and Adam: its own eager attention (the only one the port implements in transformers 5), and the same
  model with `F.scaled_dot_product_attention` swapped into its attention (``sdpa``, flash attention on CUDA), at
  our best row's batch or half of it until it fits. Our best tokens/s over each is printed as the ratio. On a TPU
  (no torch device) and without torch the peer rows are skipped and say why.

Everything runs within ``--budget_s`` (default 270 s, compiles included): a measurement that would start after it
is skipped and listed under ``skipped``. Where an NVIDIA GPU is present (``--isolate=auto``) igpt_jax's measurements
and then the peer's run in two child processes, one after the other, so that neither holds the GPU's memory (JAX
reserves most of it) while the other runs; elsewhere in this process. The JSON (``--out``) holds the device,
versions, shapes, every row, the ratios and the skipped; the table goes to stdout.

On a Cloud TPU VM: ``pip install -e '.[tpu]' 'jax[tpu]'`` then ``python bench/accelerator.py``. On a GPU machine:
``pip install -e '.[test]' 'jax[cuda12]'`` (torch with CUDA for the peer: ``pip install torch`` from PyTorch's CUDA
index) then ``python bench/accelerator.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from igpt_jax import sharding  # noqa: E402
from igpt_jax.config import defaults as config_defaults  # noqa: E402
from igpt_jax.models import decoding  # noqa: E402
from igpt_jax.models.igpt import ModelConfig, init_params  # noqa: E402
from igpt_jax.training import mfu  # noqa: E402
from igpt_jax.training import optim  # noqa: E402
from igpt_jax.training import step as train  # noqa: E402

# (layers, width, heads, image side, vocabulary, probe batch per device, sampling batches, prefill batch)
SIZES = {
    "s": dict(n_layer=24, d_model=512, n_head=8, resolution=32, vocab=512, probe_batch=8, sample_batches=(64, 1),
              prefill_batch=64, max_batch_per_device=512),
    "tiny": dict(n_layer=2, d_model=64, n_head=4, resolution=8, vocab=16, probe_batch=2, sample_batches=(4, 1),
                 prefill_batch=4, max_batch_per_device=4),
}
ATTENTIONS = {"tpu": ("dense", "splash"), "gpu": ("dense", "cudnn"), "cpu": ("dense", "blockwise")}
PEER_ATTENTIONS = ("eager", "sdpa")  # the port's own attention, and SDPA swapped into it
MEMORY_FRACTION = 0.85  # of the device's bytes_limit that the auto batch may plan to use


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="s", choices=sorted(SIZES), help="s: iGPT-S; tiny: seconds on a CPU")
    p.add_argument("--attention", default="", help="comma list (default: what applies on the platform)")
    p.add_argument("--remat", default="none,dots", help="comma list of remat policies")
    p.add_argument("--batch", type=int, default=0, help="global batch of every train row (0: the largest that fits)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per row (0: 10 on an accelerator, 2 on CPU)")
    p.add_argument("--sample_batches", default="", help="comma list of sampling batches (default: the size's)")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
    p.add_argument("--peer", default="auto", choices=["auto", "off"], help="the Hugging Face port's rows")
    p.add_argument("--budget_s", type=float, default=270.0, help="skip what would start after this many seconds")
    p.add_argument("--out", default="accelerator.json", help="the JSON report")
    p.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                   help="run JAX's and torch's measurements in child processes, one after the other, so that neither "
                        "holds device memory while the other runs (auto: where an NVIDIA GPU is present)")
    p.add_argument("--_part", default="", choices=["", "jax", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--_part_out", default="", help=argparse.SUPPRESS)
    p.add_argument("--_peer_batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_platform", default="", help=argparse.SUPPRESS)
    p.add_argument("--_peer_steps", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Clock:
    """Seconds since the start, and whether the budget still allows starting something."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.skipped = time.perf_counter(), budget_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, what: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.skipped.append(what)
        print(f"  skipped (time budget of {self.budget_s:.0f} s spent): {what}", flush=True)
        return False


def device_facts(devices: list[Any]) -> dict[str, Any]:
    stats = _memory_stats(devices[0])
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "peak_flops_per_device": mfu.peak_flops_per_device(devices[0]),
            "bytes_limit": stats.get("bytes_limit"), "jax": jax.__version__}


def _memory_stats(device: Any) -> dict[str, int]:
    try:
        return device.memory_stats() or {}
    except Exception:  # CPU backends may not implement it
        return {}


def model_config(size: dict[str, Any], attention: str, remat: str, dtype: str) -> ModelConfig:
    return ModelConfig(vocab_size=size["vocab"], n_ctx=size["resolution"] ** 2, d_model=size["d_model"],
                       n_head=size["n_head"], n_layer=size["n_layer"], attention=attention, remat=remat,
                       dtype=dtype, param_dtype="float32")


# ------------------------------------------------------------------------------------------------ train step
class TrainBench:
    """The pretraining step of one model config on `devices` (data-parallel): compile at a batch, time steps."""

    def __init__(self, cfg: ModelConfig, devices: list[Any]):
        self.cfg = cfg
        self.mesh = sharding.make_mesh((-1, 1, 1, 1), devices)
        self.rules = sharding.DEFAULT_RULES
        schedule = optax.constant_schedule(1e-4)
        self.tx = optim.make_optimizer(config_defaults.base_config().train, schedule)  # the jobs' optimizer
        self.layout = train.state_layout(cfg, self.tx, self.mesh, self.rules)
        self.fn = train.jitted_train_step(cfg, self.tx, schedule, self.layout,
                                          sharding.batch_sharding(self.mesh, self.rules), self.mesh)

    def _batch(self, batch: int, abstract: bool) -> dict[str, Any]:
        shard = sharding.batch_sharding(self.mesh, self.rules)
        shape, n = (batch, self.cfg.n_ctx), self.cfg.vocab_size
        if abstract:
            return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shard)}
        return {"tokens": jax.device_put(jax.random.randint(jax.random.key(1), shape, 0, n, jnp.int32), shard)}

    def compile(self, batch: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=sharding.replicated(self.mesh))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            compiled = self.fn.lower(self.layout.abstract, self._batch(batch, True), rng).compile()
        return compiled, time.perf_counter() - t0

    def time(self, compiled: Any, batch: int, steps: int) -> float:
        """Seconds per step over `steps` steps after one untimed step."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            state = train.create_state(self.cfg, self.tx, self.layout, self.mesh, self.rules, jax.random.key(0))
            tokens, rng = self._batch(batch, False), jax.random.key(2)
            state, metrics = compiled(state, tokens, rng)
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, tokens, rng)
            jax.block_until_ready(metrics)
        if not bool(jnp.isfinite(metrics["loss"])):
            raise FloatingPointError(f"loss {metrics['loss']} in the timed steps")
        return (time.perf_counter() - t0) / steps


def planned_bytes(compiled: Any) -> int:
    """What XLA plans for the compiled step on a device: arguments + outputs - donated + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def auto_batch(cfg: ModelConfig, size: dict[str, Any], facts: dict[str, Any], devices: list[Any]) -> int:
    """The largest power-of-two batch per device (times the devices) whose planned bytes fit `MEMORY_FRACTION` of
    the device's limit, from a probe compile at the size's probe batch: planned = fixed + per example x batch, the
    per-example bytes from the temporaries. Without a limit (CPU): the probe batch."""
    n, probe = facts["devices"], size["probe_batch"]
    if not facts["bytes_limit"]:
        return probe * n
    compiled, _ = TrainBench(cfg, devices).compile(probe * n)
    temp = compiled.memory_analysis().temp_size_in_bytes
    fixed = planned_bytes(compiled) - temp
    per_example = temp / probe
    fits = max(1, int((MEMORY_FRACTION * facts["bytes_limit"] - fixed) // per_example))
    batch = 1
    while batch * 2 <= min(fits, size["max_batch_per_device"]):
        batch *= 2
    return batch * n


def train_row(cfg: ModelConfig, batch: int, steps: int, devices: list[Any]) -> dict[str, Any]:
    """One measured train row; on a failure (out of memory at run time) the batch is halved, down to the devices."""
    bench = TrainBench(cfg, devices)
    while True:
        try:
            compiled, compile_s = bench.compile(batch)
            step_s = bench.time(compiled, batch, steps)
            break
        except Exception as err:  # XLA's RESOURCE_EXHAUSTED at compile or run time
            if batch <= len(devices) or "RESOURCE_EXHAUSTED" not in str(err).upper() + type(err).__name__.upper():
                raise
            print(f"  {cfg.attention}/{cfg.remat}: batch {batch} does not fit; trying {batch // 2}", flush=True)
            batch //= 2
    tokens_per_s = batch * cfg.n_ctx / step_s
    account = mfu.FlopsAccount.of(cfg, devices)
    return {"what": "train", "attention": cfg.attention, "remat": cfg.remat, "dtype": cfg.dtype, "batch": batch,
            "step_s": step_s, "tokens_per_s": tokens_per_s, **account.rates(tokens_per_s), "compile_s": compile_s,
            "planned_bytes": planned_bytes(compiled),
            "device_peak_bytes": _memory_stats(devices[0]).get("peak_bytes_in_use")}


# ------------------------------------------------------------------------------------------------ sampling
def _timed(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Best wall seconds of `repeats` calls of `fn` after one untimed call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def sampling_rows(cfg: ModelConfig, size: dict[str, Any], batches: list[int], clock: Clock) -> list[dict[str, Any]]:
    """Cached sampling of whole images from SOS at each of `batches` (on the default device), and the prefill of
    n_ctx - 1 tokens at the size's prefill batch."""
    cfg = cfg.replace(remat="none")
    params = jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(jax.random.key(0))
    params["wtet"] = 0.2 * jax.random.normal(jax.random.key(1), params["wtet"].shape)  # not the zero init
    rows = []
    for batch in batches:
        if not clock.allows(f"sampling at batch {batch}"):
            continue
        prefix, rng = jnp.zeros((batch, 0), jnp.int32), jax.random.key(3)
        t0 = time.perf_counter()
        generate = jax.jit(lambda p, x, r: decoding.generate(cfg, p, x, r, temperature=1.0))
        fn = generate.lower(params, prefix, rng).compile()
        compile_s = time.perf_counter() - t0
        seconds = _timed(lambda fn=fn, prefix=prefix, rng=rng: fn(params, prefix, rng), repeats=1)
        rows.append({"what": "sample", "batch": batch, "tokens_per_s": batch * cfg.n_ctx / seconds,
                     "seconds": seconds, "compile_s": compile_s, "planned_bytes": planned_bytes(fn)})
    batch = size["prefill_batch"]
    if clock.allows(f"prefill at batch {batch}"):
        prefix = jax.random.randint(jax.random.key(4), (batch, cfg.n_ctx - 1), 0, cfg.vocab_size, jnp.int32)
        t0 = time.perf_counter()
        fn = jax.jit(lambda p, x: decoding.prefill(cfg, p, x, decoding.init_cache(cfg, x.shape[0]))[0]
                     ).lower(params, prefix).compile()
        compile_s = time.perf_counter() - t0
        seconds = _timed(lambda: fn(params, prefix))
        rows.append({"what": "prefill", "batch": batch, "tokens_per_s": batch * cfg.n_ctx / seconds,
                     "seconds": seconds, "compile_s": compile_s, "planned_bytes": planned_bytes(fn)})
    return rows


# ------------------------------------------------------------------------------------------------ the peer
def _sdpa_attn(self, query, key, value, attention_mask=None):  # noqa: ARG001
    """The port's `ImageGPTAttention._attn` with `F.scaled_dot_product_attention` (causal, 1/sqrt(head_dim))."""
    import torch.nn.functional as F  # noqa: PLC0415, N812

    return F.scaled_dot_product_attention(query, key, value, is_causal=True), None


def peer_rows(size: dict[str, Any], batch: int, steps: int, clock: Clock, platform: str
              ) -> tuple[list[dict[str, Any]], str]:
    """The Hugging Face port's train step, eager and with SDPA swapped in; ([], why) when it cannot run here."""
    if clock.elapsed() >= clock.budget_s:  # say so without importing torch
        for name in PEER_ATTENTIONS:
            clock.allows(f"Hugging Face port ({name})")
        return [], ""
    try:
        import torch  # noqa: PLC0415
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: PLC0415
        from transformers.models.imagegpt import modeling_imagegpt  # noqa: PLC0415
    except ImportError as err:
        return [], f"torch/transformers not installed ({err}); pip install -e '.[test]'"
    if platform == "gpu" and not torch.cuda.is_available():
        return [], "torch has no CUDA here (a CPU build): install torch from PyTorch's CUDA index"
    if platform not in ("gpu", "cpu"):
        return [], f"torch has no {platform} device here"
    device = "cuda" if platform == "gpu" else "cpu"
    config = ImageGPTConfig(vocab_size=size["vocab"] + 1, n_positions=size["resolution"] ** 2, n_embd=size["d_model"],
                            n_layer=size["n_layer"], n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
    eager = modeling_imagegpt.ImageGPTAttention._attn
    rows = []
    for name, attn in zip(PEER_ATTENTIONS, (eager, _sdpa_attn), strict=True):
        if not clock.allows(f"Hugging Face port ({name})"):
            continue
        modeling_imagegpt.ImageGPTAttention._attn = attn
        try:
            rows.append(_peer_row(torch, ImageGPTForCausalImageModeling(config).to(device), name, device, batch,
                                  size, steps))
        finally:
            modeling_imagegpt.ImageGPTAttention._attn = eager
    return rows, ""


def _peer_row(torch: Any, model: Any, name: str, device: str, batch: int, size: dict[str, Any],
              steps: int) -> dict[str, Any]:
    """Times the port's step (bfloat16 autocast, float32 Adam) at `batch`, halving it while CUDA runs out of memory."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    n = size["resolution"] ** 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(ids):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    while True:
        ids = torch.randint(0, size["vocab"], (batch, n), device=device)
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(ids)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(ids)
            sync()
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
    step_s = (time.perf_counter() - t0) / steps
    return {"what": "peer", "attention": f"HF {name}", "remat": "none", "dtype": "bfloat16 autocast", "batch": batch,
            "step_s": step_s, "tokens_per_s": batch * n / step_s, "torch": torch.__version__,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


# ------------------------------------------------------------------------------------------------ report
def _gib(value: Any) -> str:
    return "-" if not value else f"{value / 1024**3:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """The rows as a fixed-width table (seconds: per step for train and peer rows, per call for sampling and
    prefill), and our best train row against each peer row."""
    lines = [f"{'what':<8} {'attention':<10} {'remat':<6} {'batch':>6} {'seconds':>8} {'tokens/s':>12} "
             f"{'TFLOP/s/dev':>11} {'MFU':>7} {'compile s':>9} {'XLA GiB':>8} {'peak GiB':>8}"]
    for r in report["rows"]:
        mfu_text = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        tflops = f"{r['tflops_per_device']:.3g}" if "tflops_per_device" in r else "-"
        step = f"{r['step_s']:.4f}" if "step_s" in r else f"{r['seconds']:.3f}"
        lines.append(f"{r['what']:<8} {r.get('attention', '-'):<10} {r.get('remat', '-'):<6} {r['batch']:>6} "
                     f"{step:>8} {r['tokens_per_s']:>12,.0f} {tflops:>11} {mfu_text:>7} "
                     f"{r.get('compile_s', 0):>9.1f} {_gib(r.get('planned_bytes')):>8} "
                     f"{_gib(r.get('device_peak_bytes')):>8}")
    for name, ratio in report["ratios"].items():
        lines.append(f"igpt_jax's best train step / {name}: {ratio:.2f}x tokens/s")
    if report["peer_note"]:
        lines.append(f"peer: {report['peer_note']}")
    if report["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(report['skipped'])}")
    return "\n".join(lines)


def measure_jax(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """The device's facts and igpt_jax's rows: the train steps, then sampling and prefill."""
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    size, facts = SIZES[args.size], device_facts(devices)
    sample_batches = [int(b) for b in args.sample_batches.split(",") if b] or list(size["sample_batches"])
    attentions = [a for a in args.attention.split(",") if a] or list(ATTENTIONS.get(facts["platform"], ("dense",)))
    steps = args.steps or (2 if facts["platform"] == "cpu" else 10)
    print(f"{facts['device_kind']} x {facts['devices']} ({facts['platform']}), jax {facts['jax']}; size {args.size}: "
          f"{size['n_layer']} x {size['d_model']}, {size['n_head']} heads, {size['resolution'] ** 2} tokens, "
          f"{args.dtype} compute, float32 parameters", flush=True)
    rows = []
    for remat in [r for r in args.remat.split(",") if r]:
        if not clock.allows(f"train remat {remat}"):
            continue
        batch = args.batch or auto_batch(model_config(size, attentions[0], remat, args.dtype), size, facts, devices)
        for attention in attentions:
            if clock.allows(f"train {attention}/{remat}"):
                rows.append(train_row(model_config(size, attention, remat, args.dtype), batch, steps, devices))
                print(f"  train {attention}/{remat}: batch {rows[-1]['batch']}, {rows[-1]['tokens_per_s']:,.0f} "
                      f"tokens/s ({clock.elapsed():.0f} s)", flush=True)
    rows += sampling_rows(model_config(size, "auto", "none", args.dtype), size, sample_batches, clock)
    return {"facts": facts, "rows": rows, "steps": steps, "skipped": clock.skipped}


def measure_peer(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    rows, note = peer_rows(SIZES[args.size], args._peer_batch, args._peer_steps, clock, args._platform)
    return {"rows": rows, "note": note, "skipped": clock.skipped}


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")


def _part(args: argparse.Namespace, part: str, clock: Clock, isolate: bool, **extra: Any) -> dict[str, Any]:
    """A part's result, measured here or in a child process (which holds the device only while it runs)."""
    if not isolate:
        ns = argparse.Namespace(**{**vars(args), **{f"_{k}": v for k, v in extra.items()}})
        return measure_jax(ns, clock) if part == "jax" else measure_peer(ns, clock)
    out = f"{args.out}.{part}.json"
    argv = [f"--{k}={v}" for k, v in vars(args).items() if not k.startswith("_") and k not in ("budget_s", "out")]
    argv += [f"--budget_s={max(0.0, clock.budget_s - clock.elapsed())}", f"--out={out}", f"--_part={part}",
             f"--_part_out={out}", *(f"--_{k}={v}" for k, v in extra.items())]
    subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    clock.skipped += result["skipped"]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures everything the module docstring lists; returns the report (also written to ``args.out``)."""
    clock, size = Clock(args.budget_s), SIZES[args.size]
    if args._part:  # a child of `_part`
        result = measure_jax(args, clock) if args._part == "jax" else measure_peer(args, clock)
        with open(args._part_out, "w") as f:
            json.dump(result, f)
        return result
    isolate = args.isolate == "yes" or (args.isolate == "auto" and _has_nvidia_gpu())
    ours = _part(args, "jax", clock, isolate)
    facts, rows = ours["facts"], ours["rows"]
    train = [r for r in rows if r["what"] == "train"]
    best = max(train, key=lambda r: r["tokens_per_s"]) if train else None
    peers, note = [], "--peer=off"
    if args.peer != "off":
        theirs = _part(args, "peer", clock, isolate, peer_batch=best["batch"] if best else size["probe_batch"],
                       peer_steps=ours["steps"], platform=facts["platform"])
        peers, note = theirs["rows"], theirs["note"]
    account = mfu.FlopsAccount(flops_per_token=mfu.model_flops_per_token(model_config(size, "dense", "none",
                                                                                       args.dtype))["total"],
                               devices=1, peak_per_device=facts["peak_flops_per_device"])  # torch: one device
    rows += [{**p, **account.rates(p["tokens_per_s"])} for p in peers]
    report = {**facts, "size": args.size, "shape": size, "dtype": args.dtype, "steps": ours["steps"], "rows": rows,
              "ratios": {p["attention"]: best["tokens_per_s"] / p["tokens_per_s"] for p in peers} if best else {},
              "peer_note": note, "skipped": clock.skipped, "seconds": clock.elapsed(), "isolated": isolate,
              "load_average": os.getloadavg()[0]}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report), flush=True)
    print(f"{clock.elapsed():.0f} s in all; report: {args.out}", flush=True)
    return report


if __name__ == "__main__":
    run(parse_args())
