"""The compile job: prove that a config's train step fits a TPU slice, without the slice and without the model.

``python -m igpt_jax.main --config=configs/igpt_xl.py --config.job=compile --workdir=/tmp/c`` describes the slice
named by ``config.compile.topology`` (e.g. 'v4:8x8x8') through libtpu on this machine (``pip install libtpu``; no
TPU needed), builds the config's mesh and rules on those devices, and lowers and compiles the very function the
pretraining job runs (`train.jitted_train_step`: same model, remat policy, dtypes, optimizer, batch, shardings and
donation) with abstract inputs: nothing is allocated. It prints, per device, the bytes of parameters, optimizer
state and temporaries from XLA's `memory_analysis()`, the device's HBM and whether the step fits, and the step's
FLOPs next to the model FLOPs per token, so that a measured step time turns into MFU. The same numbers go to
``WORKDIR/compile_report.json``.

Model FLOPs per token and the chip's peak are `igpt_jax.training.mfu`'s, the accounting the training loop logs
with (MaxText's way): ``6 N`` for the matmuls with weights (the blocks' q, k, v, o, fc, proj and the output head
``wtet``: N = ``12 L d^2 + V d``; the embedding lookups are gathers) plus attention's two [T, T] products, ``6 L T d``
for a causal model (counted once: a token attends to T/2 keys on average) and ``12 L T d`` for BERT. MFU = model
FLOPs per step / (step seconds x devices x peak FLOP/s per device). The step's own matmul FLOPs, counted from its
jaxpr over all layers, add the remat recomputation and the masked half of a dense causal attention (hardware
FLOPs; a Pallas kernel counts its body's matmuls once per grid step, masked blocks included, and a `shard_map` body
once per device); XLA's `cost_analysis()` of the compiled step is printed too, but it counts the body of the scan
over layers once and a Pallas kernel not at all.

ESTIMATED step time and MFU (a roofline, not a measurement): compute time = the step's matmul FLOPs per device /
the chip's peak FLOP/s; memory time = the step's bytes per device / the chip's HBM bandwidth, where the bytes are
XLA's `cost_analysis()` 'bytes accessed' times the scan's trip count (layers x micro-batches: XLA counts the body
once, so the parts outside the scan are over-counted) -- and 'bytes accessed' sums every HLO's operands and
outputs, also those that stay on chip, so the memory time is pessimistic. The larger bound is the estimate. It
leaves out collectives and kernel efficiency; a real step differs either way.

No data is read: the batch is abstract, and ``train.warmup_steps=-1`` (one epoch) compiles with
``config.compile.steps_per_epoch`` (only a constant of the learning-rate schedule). ``model.attention='auto'``
compiles as what it resolves to on the slice's TPU (`attention.resolve_implementation` with platform 'tpu' and the
sequence shards of the mesh): 'splash' when its blocks divide the per-shard length, else 'dense'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.config import checks as config_checks
from igpt_jax.data import multihost
from igpt_jax.models import attention as attention_lib
from igpt_jax.models.igpt import ModelConfig, count_params
from igpt_jax.training import mfu, optim
from igpt_jax.training import step as train
from igpt_jax.workdir import workpath_of

GIB = 1024**3

# What the pretraining pipeline yields per example (igpt_jax.data.iterators); the step reads only 'tokens'.
BATCH_FIELDS = {"label": jnp.int32, "mask": jnp.bool_, "index": jnp.int32}


class CompileError(RuntimeError):
    """The step does not compile for the slice, or does not fit its memory; `report` says what is known."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


def describe_topology(compile_cfg: Any) -> tuple[list[Any], str]:
    """The devices of the described TPU slice (compile-only: they run nothing) and the generation name.

    Raises:
      CompileError: without libtpu, or for a topology libtpu does not know.
    """
    name = str(compile_cfg.topology)
    if not name or ":" not in name:
        raise CompileError(
            f"config.compile.topology={name!r}: name a TPU slice as GENERATION:TOPOLOGY, e.g. 'v4:8x8x8' "
            "(v4-1024), 'v4:8x8x16' (v4-2048), 'v3:32x32' (v3-2048), 'v5p:8x8x16' (v5p-2048)"
        )
    generation = name.split(":")[0]
    chip_config = str(compile_cfg.chip_config)
    if chip_config == "auto":
        chip_config = "megacore" if generation in mfu.MEGACORE else "default"
    kwargs: dict[str, Any] = dict(chip_config_name=chip_config)
    if compile_cfg.chips_per_host_bounds:
        kwargs["chips_per_host_bounds"] = tuple(int(x) for x in compile_cfg.chips_per_host_bounds)
    if int(compile_cfg.num_slices) > 1:
        kwargs["num_slices"] = int(compile_cfg.num_slices)
    # Without a TPU, libtpu's lock file only serialises processes that share nothing here; do not wait on it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # noqa: PLC0415

        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as err:  # libtpu missing, or an unknown topology
        raise CompileError(
            f"cannot describe TPU topology {name!r} ({kwargs}): {err}. The compile job needs libtpu on this "
            "machine: pip install libtpu (or pip install -e '.[tpu]')"
        ) from err
    return list(topology.devices), generation


def device_facts(devices: list[Any], generation: str, compile_cfg: Any) -> dict[str, Any]:
    """Chips, hosts, HBM and peak FLOP/s per JAX device of a described slice."""
    per_chip = collections.Counter((d.process_index, tuple(getattr(d, "coords", (d.id,)))) for d in devices)
    devices_per_chip = max(per_chip.values())
    chip = mfu.CHIPS.get(generation)
    hbm_gib = float(compile_cfg.hbm_gib) or (chip["hbm_gib"] / devices_per_chip if chip else 0.0)
    if not hbm_gib:
        raise CompileError(f"no HBM size known for TPU generation {generation!r}: set config.compile.hbm_gib")
    return {
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "chips": len(per_chip),
        "devices_per_chip": devices_per_chip,
        "hosts": len({d.process_index for d in devices}),
        "hbm_bytes": int(hbm_gib * GIB),
        "peak_flops_per_device": mfu.peak_flops_per_device(devices[0]),
        "hbm_bytes_per_second_per_device": chip["hbm_gbps"] * 1e9 / devices_per_chip if chip else None,
    }


def _bytes_per_device(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def _bytes_global(abstract_tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_tree))


def _param_specs(shardings: Any) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): str(tuple(s.spec)) for path, s in flat}


def abstract_batch(global_batch: int, n_ctx: int, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The pretraining batch as ShapeDtypeStructs: tokens [batch, n_ctx] and the per-example fields [batch]."""
    batch = {"tokens": jax.ShapeDtypeStruct((global_batch, n_ctx), jnp.int32, sharding=batch_sharding)}
    for key, dtype in BATCH_FIELDS.items():
        batch[key] = jax.ShapeDtypeStruct((global_batch,), dtype, sharding=batch_sharding)
    return batch


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> tuple[dict, Any]:
    """Lowers and compiles the pretraining step of `config` for a described TPU slice; returns (report, compiled).

    Args:
      config: the full config; ``config.compile`` names the slice.
      devices: the devices to compile for (default: those of ``config.compile.topology``).

    Raises:
      CompileError: for a slice libtpu cannot describe, or a step XLA cannot fit (the report says why).
      ConfigError (a ValueError): a config the compile job cannot run, e.g. a mesh, batch or gradient accumulation
        that does not divide (`igpt_jax.config.checks.validate`, with the slice's device count).
    """
    if devices is None:
        devices, generation = describe_topology(config.compile)
    else:
        generation = str(config.compile.topology).split(":")[0]
    facts = device_facts(devices, generation, config.compile)
    config = _checked(config, num_devices=len(devices))
    step = _build_step(config, devices)
    report = _describe(config, facts, step)
    traced, compiled = _lower_and_compile(step, report)
    report["memory"] = memory_per_device(compiled, step.layout, step.batch)
    headroom = float(config.compile.headroom)
    report.update(fits=bool(report["memory"]["total_bytes"] <= headroom * facts["hbm_bytes"]), headroom=headroom)
    report["flops"], xla_bytes = _flops(compiled, traced, step, facts)
    report["estimate"] = roofline_estimate(report["flops"], xla_bytes, facts["hbm_bytes_per_second_per_device"],
                                           facts["devices"], step.model_cfg.n_layer * step.accum)
    report.update(_shardings(compiled, step.layout))
    return report, compiled


def _checked(config: ml_collections.ConfigDict, *, num_devices: int) -> ml_collections.ConfigDict:
    """A copy of `config` resolved and checked for the compile job as main does (`igpt_jax.config.checks`), with
    the slice's device count, which main does not know; a config built in code gets the same one-line errors.

    Raises:
      ConfigError: the first problem.
    """
    checked = config_checks.resolve(config.copy_and_resolve_references(), read_data=False)
    with checked.unlocked():
        checked.job = "compile"
    config_checks.validate(checked, num_devices=num_devices)
    return checked


@dataclasses.dataclass(frozen=True)
class _Step:
    """The pretraining job's step as the slice would run it, with abstract inputs."""

    model_cfg: ModelConfig  # with the attention that 'auto' resolves to on the slice
    mesh: jax.sharding.Mesh
    rules: Any
    seq_len: int
    global_batch: int
    accum: int
    seq_shards: int  # how many ways each sequence is split
    layout: Any  # `train.state_layout`: abstract state and shardings
    batch: dict[str, jax.ShapeDtypeStruct]
    rng: jax.ShapeDtypeStruct
    fn: Any  # `train.jitted_train_step`


def _build_step(config: ml_collections.ConfigDict, devices: list[Any]) -> _Step:
    """The model, mesh, optimizer, abstract state and batch of the pretraining job on `devices`; no data is read."""
    train_cfg = config.train
    seq_len = config.data.resolution**2
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    seq_shards = math.prod(mesh.shape[a] for a in sharding.mesh_axes_of("activation_length", rules))
    model_cfg = _on_tpu(ModelConfig.from_config(config.model), seq_len, seq_shards)
    warmup = optim.warmup_steps_for(train_cfg, int(config.compile.steps_per_epoch))
    schedule = optim.learning_rate_schedule(train_cfg.lr, warmup_steps=warmup, total_steps=int(train_cfg.num_steps),
                                            kind=train_cfg.schedule)
    tx = optim.make_optimizer(train_cfg, schedule)
    layout = train.state_layout(model_cfg, tx, mesh, rules)
    global_batch, accum = int(train_cfg.batch_size), int(train_cfg.grad_accum_steps)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    return _Step(
        model_cfg=model_cfg, mesh=mesh, rules=rules, seq_len=seq_len, global_batch=global_batch, accum=accum,
        seq_shards=seq_shards, layout=layout, batch=abstract_batch(global_batch, seq_len, batch_sharding),
        rng=jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                 sharding=sharding.replicated(mesh)),
        fn=train.jitted_train_step(model_cfg, tx, schedule, layout, batch_sharding, mesh, accum_steps=accum))


def _on_tpu(model_cfg: ModelConfig, seq_len: int, seq_shards: int) -> ModelConfig:
    """`model_cfg` with the attention its setting resolves to on the slice's TPU (e.g. 'auto' -> 'splash')."""
    attention = attention_lib.resolve_implementation(
        model_cfg.attention, causal=model_cfg.causal, length=seq_len, block_size=model_cfg.attention_block,
        dtype=model_cfg.dtype, platform="tpu", q_shards=seq_shards,
        splash_blocks=(model_cfg.splash_block_q, model_cfg.splash_block_kv))
    if attention == model_cfg.attention:
        return model_cfg
    logging.info("model.attention=%r compiles as %r, what it picks on this TPU slice", model_cfg.attention, attention)
    return model_cfg.replace(attention=attention)


def _describe(config: ml_collections.ConfigDict, facts: dict[str, Any], step: _Step) -> dict[str, Any]:
    """The report's description of the slice, mesh, batch, input rows per host and model."""
    model_cfg = step.model_cfg
    host_rows = multihost.rows_by_process(step.global_batch, step.mesh, sharding.batch_axes(step.rules))
    row_ranges = collections.Counter(r.rows for r in host_rows.values())
    return {
        "topology": str(config.compile.topology), **facts,
        "mesh": dict(step.mesh.shape), "rules": [[n, a] for n, a in step.rules],
        "batch_axes": list(sharding.batch_axes(step.rules)),
        "global_batch": step.global_batch, "seq_len": step.seq_len, "grad_accum_steps": step.accum,
        "sequence_shards": step.seq_shards,
        "examples_per_host": step.global_batch / facts["hosts"],
        "input": {"processes": len(host_rows),
                  "rows_per_process": max(r.size for r in host_rows.values()),
                  "processes_per_row": max(row_ranges.values())},
        "model": {"n_layer": model_cfg.n_layer, "d_model": model_cfg.d_model, "n_head": model_cfg.n_head,
                  "n_ctx": model_cfg.n_ctx, "vocab_size": model_cfg.vocab_size, "remat": model_cfg.remat,
                  "attention": model_cfg.attention, "attention_configured": str(config.model.attention),
                  "splash_blocks": [model_cfg.splash_block_q, model_cfg.splash_block_kv], "dtype": model_cfg.dtype,
                  "param_dtype": model_cfg.param_dtype, "objective": model_cfg.objective},
        "params": count_params(model_cfg),
    }


def _lower_and_compile(step: _Step, report: dict[str, Any]) -> tuple[Any, Any]:
    """(traced, compiled) step; the seconds each took go into `report`.

    Raises:
      CompileError: XLA cannot compile the step (e.g. RESOURCE_EXHAUSTED: it does not fit HBM), with the report.
    """
    t0 = time.perf_counter()
    with jax.set_mesh(step.mesh), nn.logical_axis_rules(step.rules):
        traced = step.fn.trace(step.layout.abstract, step.batch, step.rng)
        lowered = traced.lower()
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as err:  # XLA:TPU says RESOURCE_EXHAUSTED when the step cannot fit HBM
            report.update(fits=False, error=str(err).splitlines()[0][:2000],
                          lower_seconds=t1 - t0, compile_seconds=time.perf_counter() - t1)
            raise CompileError(report["error"], report) from err
    report.update(lower_seconds=t1 - t0, compile_seconds=time.perf_counter() - t1)
    return traced, compiled


def memory_per_device(compiled: Any, layout: Any, batch: Any) -> dict[str, int]:
    """Bytes per device of the compiled step (XLA's `memory_analysis()`), with the state's and batch's shares.

    ``total_bytes`` is what the step needs: max(XLA's peak, arguments + outputs - aliased + temporaries + code).
    """
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    return {
        "params_bytes": _bytes_per_device(layout.abstract.params),
        "opt_state_bytes": _bytes_per_device(layout.abstract.opt_state),
        "params_bytes_global": _bytes_global(layout.abstract.params),
        "opt_state_bytes_global": _bytes_global(layout.abstract.opt_state),
        "batch_bytes": _bytes_per_device(batch),
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "peak_bytes": peak,
        "total_bytes": max(total, peak),
    }


def _flops(compiled: Any, traced: Any, step: _Step, facts: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The report's FLOP counts (see the module docstring), and XLA's 'bytes accessed' per device."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    per_token = mfu.model_flops_per_token(step.model_cfg, step.seq_len)
    tokens_per_step = step.global_batch * step.seq_len
    step_matmul = mfu.matmul_flops(traced.jaxpr)
    flops = {
        "xla_per_device": float(cost.get("flops", 0.0)),  # XLA's count of the partitioned step: each layer once
        "step_matmul": step_matmul,  # the step's matmuls, all layers, remat recomputation included
        "step_matmul_per_device": step_matmul / facts["devices"],
        "model_per_token": per_token["total"],
        "model_per_token_6N": per_token["6N"],
        "model_per_token_attention": per_token["attention"],  # causal: counted once (6 L T d)
        "model_per_token_attention_unmasked": per_token["attention_unmasked"],  # 12 L T d
        "matmul_params": per_token["matmul_params"],
        "model_per_step": per_token["total"] * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "peak_per_device": facts["peak_flops_per_device"],
    }
    return flops, float(cost.get("bytes accessed", 0.0))


def _shardings(compiled: Any, layout: Any) -> dict[str, Any]:
    """The compiled step's parameter shardings, and whether its state shardings are the layout's."""
    in_state = compiled.input_shardings[0][0]
    return {
        "param_shardings": _param_specs(in_state.params),
        "shardings_match_layout": all(
            a.is_equivalent_to(b, len(s.shape))
            for a, b, s in zip(jax.tree.leaves(in_state), jax.tree.leaves(layout.shardings),
                               jax.tree.leaves(layout.abstract), strict=True)),
    }


def roofline_estimate(flops: dict[str, Any], xla_bytes: float, hbm_bandwidth: float | None, devices: int,
                      loop_trips: int) -> dict[str, Any]:
    """An ESTIMATED step time and MFU from the step's FLOPs and bytes per device (see the module docstring).

    Args:
      flops: the report's FLOP counts.
      xla_bytes: XLA's `cost_analysis()` 'bytes accessed' per device (the scan's body counted once).
      hbm_bandwidth: bytes per second per device.
      devices: devices of the slice.
      loop_trips: how many times the step runs the scan's body (layers x micro-batches).

    Returns:
      {} without the chip's peak or bandwidth; else compute_seconds, memory_seconds, step_seconds (the larger),
      bound ('compute' or 'memory'), hbm_bytes_per_device (XLA's bytes x loop_trips), mfu (model FLOPs per step /
      (estimated seconds x devices x peak)).
    """
    peak = flops["peak_per_device"]
    if not peak or not hbm_bandwidth:
        return {}
    hbm_bytes = xla_bytes * loop_trips
    compute_s, memory_s = flops["step_matmul_per_device"] / peak, hbm_bytes / hbm_bandwidth
    seconds = max(compute_s, memory_s)
    return {
        "compute_seconds": compute_s, "memory_seconds": memory_s, "step_seconds": seconds,
        "bound": "compute" if compute_s >= memory_s else "memory", "hbm_bytes_per_device": hbm_bytes,
        "xla_bytes_per_device": xla_bytes, "loop_trips": loop_trips,
        "mfu": flops["model_per_step"] / (seconds * devices * peak) if seconds else 0.0,
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as the table the job prints."""
    m, f = r["memory"], r["flops"]
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    attention = "causal, counted once" if r["model"]["objective"] == "ar" else "bidirectional"
    lines = [
        f"Compiled the train step for {r['topology']} ({r['device_kind']}): {r['devices']} devices = {r['chips']} "
        f"chips x {r['devices_per_chip']}, {r['hosts']} hosts",
        f"  mesh            {mesh}; batch over {tuple(r['batch_axes'])}",
        f"  model           {r['params']:,} parameters; {r['model']['n_layer']} layers, width {r['model']['d_model']}, "
        f"{r['model']['n_head']} heads, context {r['model']['n_ctx']}; remat {r['model']['remat']}, attention "
        f"{r['model']['attention']}, compute {r['model']['dtype']}, params {r['model']['param_dtype']}",
        f"  batch           {r['global_batch']} x {r['seq_len']} tokens, {r['grad_accum_steps']} micro-batch(es)",
        "  per device:",
        f"    parameters      {gib(m['params_bytes'])}   (of {m['params_bytes_global'] / GIB:.2f} GiB)",
        f"    optimizer state {gib(m['opt_state_bytes'])}   (of {m['opt_state_bytes_global'] / GIB:.2f} GiB)",
        f"    arguments       {gib(m['argument_bytes'])}   (state + batch; the state is donated: "
        f"{m['alias_bytes'] / GIB:.3f} GiB aliased)",
        f"    outputs         {gib(m['output_bytes'])}",
        f"    temporaries     {gib(m['temp_bytes'])}   (activations, gradients, remat, collectives)",
        f"    code            {gib(m['code_bytes'])}",
        f"    total           {gib(m['total_bytes'])}   of {r['hbm_bytes'] / GIB:.1f} GiB HBM "
        f"({100 * m['total_bytes'] / r['hbm_bytes']:.1f} %)",
        f"  fits            {'YES' if r['fits'] else 'NO'} (limit {r['headroom']:.0%} of HBM)",
        f"  FLOPs           step {f['step_matmul']:.4g} in matmuls ({f['step_matmul_per_device']:.4g} per device, "
        f"remat recomputation included); XLA's cost_analysis {f['xla_per_device']:.4g} per device (counts the "
        "scan over layers once)",
        f"                  model {f['model_per_token']:.4g} per token = 6N {f['model_per_token_6N']:.4g} + attention "
        f"{f['model_per_token_attention']:.4g} ({attention}); {f['model_per_step']:.4g} per step of "
        f"{f['tokens_per_step']:,} tokens",
    ]
    if f["peak_per_device"]:
        lines.append(f"                  MFU = {f['model_per_step']:.4g} / (step seconds x {r['devices']} x "
                     f"{f['peak_per_device']:.4g} FLOP/s);  a step of "
                     f"{f['model_per_step'] / (r['devices'] * f['peak_per_device']):.3g} s would be 100 %")
    e = r.get("estimate") or {}
    if e:
        lines.append(f"  ESTIMATE        step {e['step_seconds']:.3g} s ({e['bound']}-bound: compute "
                     f"{e['compute_seconds']:.3g} s, HBM {e['memory_seconds']:.3g} s for "
                     f"{e['hbm_bytes_per_device'] / GIB:.2f} GiB), MFU {100 * e['mfu']:.1f} % -- a roofline from "
                     "cost analysis, not a measurement")
    lines.append(f"  compile time    {r['compile_seconds']:.1f} s (+ {r['lower_seconds']:.1f} s to lower) here")
    inp = r["input"]
    shared = (f"; each example loaded by {inp['processes_per_row']} hosts (a model axis spans them)"
              if inp["processes_per_row"] > 1 else "")
    lines.append(f"  input           each of {inp['processes']} hosts loads {inp['rows_per_process']} of the "
                 f"{r['global_batch']} examples per step{shared}")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Compiles the config's train step for ``config.compile.topology``, prints the table, writes the report.

    Returns:
      The report (also in ``WORKDIR/compile_report.json``).

    Raises:
      CompileError: when the step does not compile or does not fit (after printing and writing the report).
    """
    workpath = workpath_of(workdir)
    workpath.mkdir(parents=True, exist_ok=True)
    try:
        report, _ = compile_train_step(config, devices)
    except CompileError as err:
        failed = {**err.report, "fits": False, "error": str(err)}
        (workpath / workdir_files.COMPILE_REPORT).write_text(json.dumps(failed, indent=2))
        print(f"The train step does NOT compile for {config.compile.topology}: {err}", flush=True)
        raise
    (workpath / workdir_files.COMPILE_REPORT).write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)
    print(f"Report: {workpath / 'compile_report.json'}", flush=True)
    if not report["fits"]:
        raise CompileError(
            f"the step needs {report['memory']['total_bytes'] / GIB:.2f} GiB per device, more than "
            f"{report['headroom']:.0%} of {report['hbm_bytes'] / GIB:.1f} GiB", report
        )
    return report
