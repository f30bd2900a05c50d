"""FLOP accounting, MaxText's way: model FLOPs per token from the config, a device's peak from a table, and MFU.

One accounting for every place that turns a speed into FLOP/s: the training loop's progress line, ``metrics.jsonl``
and TensorBoard (`FlopsAccount`), the compile job's report and roofline estimate, and ``bench/accelerator.py``.

Model FLOPs per token (`model_flops_per_token`), forward + backward = 3 x forward:

* matmuls with weights: ``6 N``, where N counts the parameters that take part in matmuls: per block q, k, v, o
  (``4 d^2``) and fc, proj (``2 d d_mlp``), and the output head ``wtet`` (``V d``); the embedding lookups are gathers
  and norms, softmax and the loss are not matmuls;
* attention's two [T, T] products (scores ``Q K^T`` and ``P V``): ``2 x 2 T d`` per token and layer forward, so
  ``12 L T d`` forward + backward without a mask. Under the causal mask (objective 'ar') a token attends to the
  keys before it, T/2 on average, so it is counted ONCE: ``6 L T d`` (MaxText's `calculate_tflops_training_per_device`
  halves the attention FLOPs of causal models the same way; PaLM's appendix B counts ``12 L T d`` for both). The
  bidirectional BERT objective counts the whole ``12 L T d``.

The remat recomputation is not model FLOPs (that is what makes MFU comparable across remat policies), and neither
are the masked halves that a dense kernel computes anyway: a dense causal step computes more matmul FLOPs than
the model FLOPs (`matmul_flops` of its jaxpr counts what it computes).

Peaks (`peak_flops_per_device`): dense bf16 FLOP/s of the JAX device: TPU v2/v3/v4/v5e/v5p/v6e from Cloud TPU's
documentation (a v2/v3 JAX device is one of the chip's two TensorCores; a v4/v5p device is the megacore chip), NVIDIA
A100/H100/H200 from NVIDIA's data sheets (dense, i.e. without 2:4 sparsity). A CPU, or a device not in the table,
has no known peak: MFU is then not computed (the progress line says ``MFU n/a``); the TFLOP/s still are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.extend.core as jax_core

from igpt_jax.models.igpt import ModelConfig

# Per chip: HBM GiB, dense bf16 peak TFLOP/s, HBM bandwidth GB/s (Cloud TPU documentation) and TensorCores. A JAX
# device is one core (v2, v3; HBM split evenly) or, with megacore (v4, v5p; `num_cores` 2), the whole chip.
CHIPS = {
    "v2": dict(hbm_gib=16, peak_tflops=45, hbm_gbps=700, cores=2),
    "v3": dict(hbm_gib=32, peak_tflops=123, hbm_gbps=900, cores=2),
    "v4": dict(hbm_gib=32, peak_tflops=275, hbm_gbps=1228, cores=2),
    "v5e": dict(hbm_gib=16, peak_tflops=197, hbm_gbps=819, cores=1),
    "v5litepod": dict(hbm_gib=16, peak_tflops=197, hbm_gbps=819, cores=1),
    "v5p": dict(hbm_gib=95, peak_tflops=459, hbm_gbps=2765, cores=2),
    "v6e": dict(hbm_gib=32, peak_tflops=918, hbm_gbps=1640, cores=1),
}
MEGACORE = ("v4", "v5p")
# `device_kind` of a TPU device -> generation (libtpu's names: 'TPU v5 lite' is v5e, 'TPU v5' is v5p).
TPU_KINDS = {"TPU v2": "v2", "TPU v3": "v3", "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
             "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# Substrings of a GPU's `device_kind` -> dense bf16 TFLOP/s (first match wins: the PCIe/NVL parts before the SXM one).
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                   ("GH200", 989.4), ("A100", 312.0))


def model_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Training (forward + backward) model FLOPs per token of `cfg`, see the module docstring.

    Args:
      cfg: the model.
      seq_len: tokens per sequence (default ``cfg.n_ctx``).

    Returns:
      ``matmul_params`` (N), ``6N``, ``attention`` (``6 L T d`` causal, counted once; ``12 L T d`` bidirectional),
      ``attention_unmasked`` (``12 L T d``: what a kernel that computes the whole [T, T] square does) and ``total``
      (``6N + attention``).
    """
    matmul_params = cfg.n_layer * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_mlp) + cfg.vocab_size * cfg.d_model
    unmasked = 12.0 * cfg.n_layer * (seq_len or cfg.n_ctx) * cfg.d_model
    attention = unmasked / 2 if cfg.causal else unmasked
    return {"matmul_params": matmul_params, "6N": 6.0 * matmul_params, "attention": attention,
            "attention_unmasked": unmasked, "total": 6.0 * matmul_params + attention}


def tpu_generation(device_kind: str) -> str | None:
    """'v4' for 'TPU v4', 'v5e' for 'TPU v5 lite', ...; None for a device that is not a known TPU."""
    return TPU_KINDS.get(device_kind.strip())


def peak_flops_per_device(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one JAX device (a `jax.Device`, or anything with ``device_kind`` and
    ``platform``), or None where unknown (CPU, an unlisted accelerator)."""
    kind = str(getattr(device, "device_kind", ""))
    platform = str(getattr(device, "platform", "")).lower()
    generation = tpu_generation(kind)
    if generation is not None:
        chip = CHIPS[generation]
        return chip["peak_tflops"] * 1e12 * int(getattr(device, "num_cores", 1) or 1) / chip["cores"]
    if platform in ("gpu", "cuda", "rocm") or kind.startswith("NVIDIA"):
        for name, tflops in GPU_PEAK_TFLOPS:
            if name in kind:
                return tflops * 1e12
    return None


@dataclasses.dataclass(frozen=True)
class FlopsAccount:
    """What turns a run's tokens/s into per-device TFLOP/s and MFU.

    Attributes:
      flops_per_token: training model FLOPs per token (`model_flops_per_token`'s total).
      devices: the devices the step runs on.
      peak_per_device: their dense bf16 peak FLOP/s, or None (CPU: no MFU).
      device_kind: what they are, for messages.
    """

    flops_per_token: float
    devices: int
    peak_per_device: float | None
    device_kind: str = ""

    @classmethod
    def of(cls, cfg: ModelConfig, devices: Any, seq_len: int | None = None) -> FlopsAccount:
        """The account of a model trained on `devices` (a list, a mesh's ``devices`` array or one device)."""
        flat = list(getattr(devices, "flat", devices)) if not hasattr(devices, "device_kind") else [devices]
        return cls(flops_per_token=model_flops_per_token(cfg, seq_len)["total"], devices=len(flat),
                   peak_per_device=peak_flops_per_device(flat[0]), device_kind=str(flat[0].device_kind))

    def rates(self, tokens_per_sec: float) -> dict[str, float]:
        """``tflops_per_device`` and, with a known peak, ``mfu`` (a fraction) at `tokens_per_sec` (global)."""
        flops_per_device = tokens_per_sec * self.flops_per_token / self.devices
        out = {"tflops_per_device": flops_per_device / 1e12}
        if self.peak_per_device:
            out["mfu"] = flops_per_device / self.peak_per_device
        return out


def _repeats(eqn: Any) -> int:
    """How many times an equation runs its inner jaxprs: a scan's length, a Pallas kernel's grid steps, a
    `shard_map` body once per device of its mesh."""
    name = eqn.primitive.name
    if name == "scan":
        return eqn.params["length"]
    if name == "pallas_call":
        return math.prod(eqn.params["grid_mapping"].grid)
    if name == "shard_map":
        return eqn.params["mesh"].size
    return 1


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the matmuls (dot_general: 2 x output size x contracted size) of a jaxpr, for the whole global batch.

    Loops count their trip count (scan ``length``; XLA's `cost_analysis()` counts a loop body once), the remat
    recomputation is in the step's jaxpr explicitly, and of a `cond`'s branches the most expensive counts. A
    Pallas kernel counts its body once per grid step (masked blocks too), a `shard_map` body once per device.
    These are the FLOPs the step computes (hardware FLOPs), not the model FLOPs.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
            continue
        inner = []
        for value in eqn.params.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            inner.append([matmul_flops(v) for v in values if isinstance(v, (jax_core.ClosedJaxpr, jax_core.Jaxpr))])
        sub = sum(max(branches) if eqn.primitive.name == "cond" else sum(branches) for branches in inner if branches)
        total += sub * _repeats(eqn)
    return total
