"""FLOP accounting (igpt_jax/training/mfu.py): model FLOPs per token against a hand count and against the matmuls a
traced training step computes, the peak table, and TFLOP/s per device and MFU in the progress line, metrics.jsonl
and TensorBoard."""

import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from igpt_jax.models import objectives
from igpt_jax.models.igpt import ModelConfig, init_params
from igpt_jax.training import mfu
from igpt_jax.training.metric_writers import ProgressLogger
from igpt_jax.training.run_log import RunLog

# 2 layers, width 64, MLP 256, 16 positions (4x4), 16 colours.
SMALL = ModelConfig(vocab_size=16, n_ctx=16, d_model=64, n_head=4, n_layer=2, attention="dense", remat="none")


def test_model_flops_per_token_is_the_hand_count_with_causal_attention_counted_once():
    # Per block: q, k, v, o 4 x 64 x 64 = 16,384 and fc, proj 2 x 64 x 256 = 32,768 weights; 2 blocks = 98,304, the
    # output head 16 x 64 = 1,024: N = 99,328; 6N = 595,968. Attention forward per token and layer: scores 2 x 16 x 64
    # plus P V 2 x 16 x 64 = 4,096, x3 with the backward = 12,288, x2 layers = 24,576 unmasked; causal: half.
    counted = mfu.model_flops_per_token(SMALL)
    assert counted == {"matmul_params": 99_328, "6N": 595_968.0, "attention": 12_288.0,
                       "attention_unmasked": 24_576.0, "total": 608_256.0}
    bert = mfu.model_flops_per_token(SMALL.replace(objective="bert"))
    assert (bert["attention"], bert["total"]) == (24_576.0, 620_544.0)  # bidirectional: the whole square
    assert mfu.model_flops_per_token(SMALL, seq_len=8)["attention"] == 6_144.0  # T is the sequence's length


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_model_flops_equal_the_matmuls_of_a_traced_gradient_step(objective):
    """The dense kernel computes the whole [T, T] square, masked or not: the traced forward + backward's matmuls are
    6N + 12 L T d per token, i.e. the model FLOPs plus (causal only) the masked half they leave out."""
    cfg = SMALL.replace(objective=objective)
    params = nn.meta.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    tokens = jnp.zeros((3, cfg.n_ctx), jnp.int32)

    def loss(p):
        mask = None if cfg.causal else jnp.ones(tokens.shape, bool)
        return objectives.lm_loss(cfg, p, tokens, jax.random.key(1), bert_mask=mask)[0]

    traced = mfu.matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))
    counted = mfu.model_flops_per_token(cfg)
    assert traced == 3 * cfg.n_ctx * (counted["6N"] + counted["attention_unmasked"])
    assert traced - 3 * cfg.n_ctx * counted["total"] == (3 * cfg.n_ctx * 12_288 if cfg.causal else 0)


def _device(kind, platform="tpu", num_cores=1):
    return types.SimpleNamespace(device_kind=kind, platform=platform, num_cores=num_cores)


def test_peak_per_device_from_the_table_and_none_on_cpu():
    assert mfu.peak_flops_per_device(_device("TPU v3")) == 61.5e12  # one of the chip's two cores
    assert mfu.peak_flops_per_device(_device("TPU v4", num_cores=2)) == 275e12  # megacore: the chip
    assert mfu.peak_flops_per_device(_device("TPU v4", num_cores=1)) == 137.5e12
    assert mfu.peak_flops_per_device(_device("TPU v5", num_cores=2)) == 459e12  # libtpu's name of a v5p
    assert mfu.peak_flops_per_device(_device("TPU v5 lite")) == 197e12
    assert mfu.peak_flops_per_device(_device("TPU v6 lite")) == 918e12
    assert mfu.peak_flops_per_device(_device("NVIDIA H100 80GB HBM3", "gpu")) == 989.4e12
    assert mfu.peak_flops_per_device(_device("NVIDIA H100 PCIe", "gpu")) == 756e12
    assert mfu.peak_flops_per_device(_device("NVIDIA H200", "gpu")) == 989.4e12
    assert mfu.peak_flops_per_device(_device("NVIDIA A100-SXM4-80GB", "gpu")) == 312e12
    assert mfu.peak_flops_per_device(_device("NVIDIA GeForce RTX 4090", "gpu")) is None
    assert mfu.peak_flops_per_device(jax.devices()[0]) is None  # the CPU
    account = mfu.FlopsAccount.of(SMALL, jax.devices()[:2])
    assert (account.flops_per_token, account.devices, account.peak_per_device) == (608_256.0, 2, None)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_line_shows_tflops_per_device_and_mfu():
    clock, lines = FakeClock(), []
    # 1e9 FLOPs per token on 4 devices of 100 TFLOP/s peak; 1,024 tokens per step.
    account = mfu.FlopsAccount(flops_per_token=1e9, devices=4, peak_per_device=100e12)
    progress = ProgressLogger(1000, start_step=100, tokens_per_step=1024, log_fn=lines.append, clock=clock,
                              flops=account)
    assert progress.log(100, {}) == "step  100/1000 | tok/s n/a | TFLOP/s/dev n/a | MFU n/a | ETA n/a"
    clock.t = 2.0  # 10 steps in 2 s: 5,120 tok/s x 1e9 / 4 = 1.28 TFLOP/s per device = 1.28 % of 100
    assert progress.log(110, {}) == "step  110/1000 | 5,120 tok/s | 1.28 TFLOP/s/dev | MFU 1.3 % | ETA 2m58s"
    assert progress.throughput() == pytest.approx({"tokens_per_sec": 5120, "tflops_per_device": 1.28, "mfu": 0.0128})
    no_peak = ProgressLogger(1000, tokens_per_step=1024, log_fn=lines.append, clock=clock,
                             flops=mfu.FlopsAccount(flops_per_token=1e9, devices=1, peak_per_device=None))
    no_peak.log(0, {})
    clock.t = 4.0
    assert no_peak.log(10, {}) == "step   10/1000 | 5,120 tok/s | 5.12 TFLOP/s/dev | MFU n/a | ETA 3m18s"


def test_metrics_jsonl_and_tensorboard_get_the_rates_and_the_history_does_not(tmp_path):
    account = mfu.FlopsAccount(flops_per_token=2e10, devices=2, peak_per_device=4e12)
    log = RunLog(tmp_path, num_steps=10, start_step=0, tokens_per_step=100, local=True, flops=account)
    clock = FakeClock()
    log.progress._clock = clock  # noqa: SLF001 (a fake clock: 2 steps per second)
    for step in (1, 2, 3, 4):
        log.add(step, {"loss": jnp.float32(1.0 / step)})
        if step % 2 == 0:
            clock.t += 1.0
            log.flush(last_good=None, directory=tmp_path)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in records] == [["loss", "step"]] * 3 + [
        ["loss", "mfu", "step", "tflops_per_device", "tokens_per_sec"]]
    # 2 steps/s x 100 tokens = 200 tok/s; x 2e10 FLOPs / 2 devices = 2 TFLOP/s per device = 50 % of 4 TFLOP/s.
    assert records[-1]["tokens_per_sec"] == 200.0
    assert records[-1]["tflops_per_device"] == pytest.approx(2.0)
    assert records[-1]["mfu"] == pytest.approx(0.5)
    assert all(sorted(h) == ["loss", "step"] for h in log.history)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    mfu_events = acc.Tensors("perf/mfu")
    assert [e.step for e in mfu_events] == [4]
    assert tensor_util.make_ndarray(mfu_events[0].tensor_proto).item() == pytest.approx(records[-1]["mfu"])
