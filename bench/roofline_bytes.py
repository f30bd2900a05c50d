r"""Which HLO ops carry the bytes of the compile job's roofline estimate: a breakdown of XLA's 'bytes accessed'.

    python bench/roofline_bytes.py --config=configs/igpt_xl.py:pod=v4-1024 [--loop_aware] \
        [--config.model.dtype=bfloat16 ...]

Compiles the config's train step for its TPU slice exactly as the compile job does (`compile_train_step`, libtpu,
no TPU), prints the job's ESTIMATE line, then splits the per-device bytes of the optimised HLO's top-level
instructions (those XLA's `cost_analysis()` sums: every instruction of the entry computation, of while-loop bodies
and of called computations, not the insides of fusions) by

* where: the scan over layers (the while body that runs n_layer times; the estimate multiplies the whole count by
  the trip count) or outside it;
* kind: matmul fusions (a fusion holding a dot or convolution), other fusions (elementwise, reductions), the
  collectives (all-gather, reduce-scatter, all-reduce, ...), copies and transposes, dynamic (update-)slices,
  custom calls (the splash kernel);
* element type of each operand and result (f32, bf16, s32, ...);
* the model part the op comes from (its ``op_name`` metadata: attention, MLP, norms, head and loss, optimizer), and
  whether it is the backward pass (``transpose``) or remat recomputation (``remat``/``checkpoint``).

Bytes of an instruction = its operands' and result's sizes (per device), roughly the way HloCostAnalysis counts a
top-level op (XLA:TPU's ``AllocateBuffer`` custom calls, buffers reserved for a zero broadcast, count nothing); the
total is printed next to XLA's own 'bytes accessed', which it does not match exactly (XLA counts a fusion's operands
by how its body reads them): read the shares, not the absolute figures. An estimate's anatomy, not a measurement.

``--loop_aware`` compiles the step a second time with ``model.scan_unroll`` doubled: the difference of XLA's two
'bytes accessed' is the bytes of the extra layers in the body, so the step's bytes can be counted with the body once
per layer and the rest (optimizer, gradient norms, embedding, head, loss) once, where the compile job's estimate
multiplies everything by the layer count (`loop_aware_bytes`).
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
from typing import Any

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "token": 0}
SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "iota", "opt-barrier", "while", "call", "conditional"}  # loops and calls: their bodies count
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
PARTS = (("scan stacking (dynamic slice/update)", r"dynamic_(update_)?index_in_dim|dynamic_(update_)?slice"),
         ("attention", r"/attn/"), ("mlp", r"/mlp/"), ("norms", r"/ln_[12f]/"),
         ("head+loss", r"btd,vd->btv|take_along_axis|log_softmax|logsumexp"), ("embedding", r"_take|/wte|/wpe"))


def shapes_bytes(text: str) -> dict[str, int]:
    """Bytes by element type of every array shape written in `text`."""
    out: dict[str, int] = collections.Counter()
    for dtype, dims in SHAPE.findall(text):
        out[dtype] += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return out


def split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            comps[current].append(line)
    return comps, entry


def top_level(comps: dict[str, list[str]], entry: str, loop_trips: int) -> dict[str, int]:
    """The computations whose instructions XLA's cost analysis counts, each with the loop trips it runs inside
    (1 for the entry; a while body's known trip count, or `loop_trips` where XLA:TPU does not write it, times its
    parent's)."""
    trips, todo = {entry: 1}, [entry]
    while todo:
        name = todo.pop()
        for line in comps.get(name, []):
            n = re.search(r'known_trip_count"?[:=]\{"?n"?[:=]"?(\d+)', line)
            for key in ("body", "condition", "to_apply", "true_computation", "false_computation"):
                m = re.search(rf"\b{key}=%?([\w.\-]+)", line)
                if m and (key != "to_apply" or re.search(r"\scall\(", line)) and m.group(1) not in trips:
                    trips[m.group(1)] = trips[name] * ((int(n.group(1)) if n else loop_trips) if key == "body" else 1)
                    todo.append(m.group(1))
            for m in re.finditer(r"branch_computations=\{([^}]*)\}", line):
                for b in re.findall(r"%?([\w.\-]+)", m.group(1)):
                    if b not in trips:
                        trips[b] = trips[name]
                        todo.append(b)
    return trips


def kind_of(opcode: str, line: str, comps: dict[str, list[str]]) -> str:
    if opcode in COLLECTIVES or opcode.rsplit("-", 1)[0] in COLLECTIVES:
        return opcode.replace("-start", "").replace("-done", "")
    if opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(called.group(1), [])) if called else ""
        if re.search(r"\s(dot|convolution)\(", body):
            return "matmul fusion"
        return "other fusion (" + (re.search(r"kind=(k\w+)", line).group(1) if "kind=" in line else "?") + ")"
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    if opcode in ("dynamic-slice", "dynamic-update-slice"):
        return opcode
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call {target.group(1) if target else ''}".strip()
    return opcode


def part_of(line: str) -> str:
    name = re.search(r'op_name="([^"]*)"', line)
    text = name.group(1) if name else ""
    fallback = "other model" if "IGPT" in text else "optimizer, metrics, other"
    part = next((p for p, pattern in PARTS if re.search(pattern, text)), fallback)
    if "transpose(" in text:
        part += " (backward)"
    elif "remat" in text or "checkpoint" in text:
        part += " (remat)"
    return part


def breakdown(hlo: str, n_layer: int) -> dict[str, Any]:
    """Per-device bytes of the top-level instructions by where, kind, element type and model part."""
    comps, entry = split_computations(hlo)
    trips = top_level(comps, entry, n_layer)
    tables = {k: collections.Counter() for k in ("where", "kind", "dtype", "part", "kind in layers")}
    biggest, total = [], 0
    for comp, runs in trips.items():
        where = "scan over layers" if runs >= n_layer and runs % n_layer == 0 else "outside the layer loop"
        parsed = [(m, line) for line in comps.get(comp, []) if (m := INSTRUCTION.match(line))]
        results = {m.group(1): m.group(2) for m, _ in parsed}  # operands printed without shapes: look them up
        for m, line in parsed:
            if m.group(3) in FREE or 'custom_call_target="AllocateBuffer"' in line:
                continue  # AllocateBuffer: a buffer XLA:TPU reserves (a zero broadcast it never writes), no traffic
            result, args = m.group(2), m.group(4).split("), ")[0]
            if not SHAPE.search(args):
                args = " ".join(results.get(name, "") for name in re.findall(r"%([\w.\-]+)", args))
            by_dtype = shapes_bytes(result) + shapes_bytes(args)
            size = sum(by_dtype.values())
            kind = kind_of(m.group(3), line, comps)
            total += size
            tables["where"][where] += size
            tables["kind"][kind] += size
            if where == "scan over layers":
                tables["kind in layers"][kind] += size
            tables["part"][part_of(line)] += size
            tables["dtype"].update(by_dtype)
            biggest.append((size, where, kind, line.strip()[:160]))
    biggest.sort(reverse=True)
    return {"total": total, **{k: dict(v) for k, v in tables.items()}, "biggest": biggest}


def format_breakdown(b: dict[str, Any], xla_bytes: float, top: int) -> str:
    gib = 1024**3
    lines = [f"bytes of the top-level HLO, per device, each instruction once: {b['total'] / gib:.3f} GiB "
             f"(XLA's 'bytes accessed': {xla_bytes / gib:.3f} GiB)"]
    for key in ("where", "kind", "kind in layers", "dtype", "part"):
        lines.append(f"  by {key}:")
        for name, size in sorted(b[key].items(), key=lambda kv: -kv[1]):
            if size >= 0.005 * b["total"]:
                lines.append(f"    {name:<40} {size / gib:9.3f} GiB  {100 * size / b['total']:5.1f} %")
    lines.append(f"  the {top} largest instructions:")
    for size, where, kind, text in b["biggest"][:top]:
        lines.append(f"    {size / gib:7.3f} GiB  {where[:7]:<7} {kind:<22} {text}")
    return "\n".join(lines)


def loop_aware_bytes(bytes_1: float, bytes_2: float, n_layer: int, unroll: int, accum: int = 1) -> dict[str, float]:
    """XLA's bytes with the layer scan's body counted once per layer and the rest once per step.

    `bytes_1` is XLA's 'bytes accessed' of the step as configured (the scan body, `unroll` layers, counted once),
    `bytes_2` of the same step with the body unrolled twice as far; their difference is `unroll` layers' bytes. The
    compile job's estimate multiplies `bytes_1` by n_layer x micro-batches, i.e. also the optimizer, the embedding,
    the head and the loss; here the body runs n_layer x `accum` times and everything else once (the per-micro-batch
    embedding, head and loss are then under-counted when `accum` > 1).
    """
    per_layer = (bytes_2 - bytes_1) / unroll
    outside = bytes_1 - unroll * per_layer
    return {"per_layer": per_layer, "outside": outside, "total": outside + n_layer * accum * per_layer}


def _loop_aware(compile_job: Any, config: Any, report: dict[str, Any]) -> str:
    """Compiles the step again with the scan unrolled twice as far; the loop-aware estimate line."""
    # 0 (auto) is a rolled scan on a TPU slice (igpt_jax.models.igpt.scan_unroll_for)
    unroll, n_layer = int(config.model.scan_unroll) or 1, int(report["model"]["n_layer"])
    doubled = config.copy_and_resolve_references()
    doubled.model.scan_unroll = 2 * unroll
    report_2, _ = compile_job.compile_train_step(doubled)
    e, f = report["estimate"], report["flops"]
    b = loop_aware_bytes(e["xla_bytes_per_device"], report_2["estimate"]["xla_bytes_per_device"], n_layer, unroll,
                         int(report["grad_accum_steps"]))
    memory_s = b["total"] / e["hbm_bytes_per_device"] * e["memory_seconds"]
    seconds = max(e["compute_seconds"], memory_s)
    mfu = f["model_per_step"] / (seconds * report["devices"] * f["peak_per_device"])
    return (f"  LOOP-AWARE      step {seconds:.3g} s (HBM {memory_s:.3g} s for {b['total'] / 1024**3:.2f} GiB: "
            f"{b['per_layer'] / 1024**3:.3f} GiB per layer x {n_layer} + {b['outside'] / 1024**3:.3f} GiB once), "
            f"MFU {100 * mfu:.1f} % -- XLA's bytes with the body counted per layer (unroll {unroll} vs {2 * unroll})")


def main(argv: list[str]) -> None:
    del argv
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from igpt_jax.jobs import compile as compile_job  # noqa: PLC0415 (jax and libtpu: only for the command)

    report, compiled = compile_job.compile_train_step(flags.FLAGS.config)
    print(compile_job.format_report(report), flush=True)
    hlo = compiled.as_text()
    if flags.FLAGS.hlo_out:
        with open(flags.FLAGS.hlo_out, "w") as f:
            f.write(hlo)
    if flags.FLAGS.loop_aware:
        print(_loop_aware(compile_job, flags.FLAGS.config, report), flush=True)
    b = breakdown(hlo, int(report["model"]["n_layer"]))
    print(format_breakdown(b, report["estimate"].get("xla_bytes_per_device", 0.0), flags.FLAGS.top), flush=True)


if __name__ == "__main__":  # the flags are defined here only, so that tests can import the parser
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the config file[:variant], as for igpt_jax.main")
    flags.DEFINE_integer("top", 12, "largest single instructions to list")
    flags.DEFINE_string("hlo_out", "", "also write the optimised HLO text here")
    flags.DEFINE_bool("loop_aware", False, "compile again with the scan unrolled twice as far and print the "
                      "loop-aware estimate (the layer body's bytes counted per layer, the rest once)")
    app.run(main)
