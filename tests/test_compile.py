"""The compile job: the pretraining step compiled ahead of time for a described TPU slice (needs libtpu; no TPU)."""

import json
import math

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

pytest.importorskip("libtpu", reason="the compile job needs libtpu (pip install libtpu) to describe TPU slices")

from igpt_jax.config import checks as config_checks  # noqa: E402
from igpt_jax.config import defaults as config_defaults  # noqa: E402
from igpt_jax.errors import ConfigError  # noqa: E402
from igpt_jax.jobs import compile as compile_job  # noqa: E402

TOPOLOGY = "v4:2x2x1"  # 4 chips, one JAX device each (megacore), one host


@pytest.fixture(autouse=True, scope="module")
def no_persistent_compilation_cache():
    """TPU programs compiled for a described slice are not for this process's CPU client: the session's persistent
    compilation cache (tests/conftest.py) could store them but not load them back (JAX warns and recompiles)."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # whether the cache is used is decided once per process: decide again
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _tiny_config():
    config = config_defaults.base_config()  # 2 layers, width 64, 4 heads, context 64, vocabulary 16
    config.job = "compile"
    config.model.remat = "none"
    config.model.attention = "dense"
    config.train.batch_size = 8
    config.mesh.shape = (1, 4, 1)  # fsdp over the 4 devices: every parameter has an 'embed' dimension of 64
    config.compile.topology = TOPOLOGY
    return config_checks.resolve(config)  # vocabulary and context follow the data (digits: 16 colours, 8x8)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        compile_job.describe_topology(_tiny_config().compile)
    except compile_job.CompileError as err:
        pytest.skip(f"libtpu cannot describe {TOPOLOGY} here: {err}")
    workdir = tmp_path_factory.mktemp("compile")
    result = compile_job.run(_tiny_config(), str(workdir))
    assert json.loads((workdir / "compile_report.json").read_text()) == json.loads(json.dumps(result))
    return result


def test_describes_the_slice(report):
    assert report["device_kind"] == "TPU v4"
    assert (report["devices"], report["chips"], report["devices_per_chip"], report["hosts"]) == (4, 4, 1, 1)
    assert report["hbm_bytes"] == 32 * 1024**3
    assert report["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert report["batch_axes"] == ["data", "fsdp"]
    assert report["input"] == {"processes": 1, "rows_per_process": report["global_batch"], "processes_per_row": 1}


def test_memory_per_device_is_the_fsdp_shard(report):
    m = report["memory"]
    assert m["params_bytes_global"] == report["params"] * 4  # float32
    assert m["params_bytes"] * 4 == m["params_bytes_global"]
    # Adam's two moments are sharded like the parameters; its step counters are replicated scalars.
    scalars = m["opt_state_bytes_global"] - 2 * m["params_bytes_global"]
    assert 0 < scalars <= 16
    assert m["opt_state_bytes"] == 2 * m["params_bytes"] + scalars
    # The donated state comes back in place; the step needs its arguments, temporaries and code, far below HBM.
    assert m["argument_bytes"] >= m["params_bytes"] + m["opt_state_bytes"] + m["batch_bytes"]
    assert m["alias_bytes"] >= m["params_bytes"] + m["opt_state_bytes"]
    assert m["temp_bytes"] > 0
    assert 0 < m["total_bytes"] < report["headroom"] * report["hbm_bytes"]
    assert report["fits"] is True


def test_the_step_keeps_the_layout_shardings(report):
    assert report["shardings_match_layout"] is True
    specs = report["param_shardings"]
    # [layers, embed, mlp], [layers, embed, heads, kv], [vocab, embed] under DEFAULT_RULES ('tensor' has size 1).
    assert specs["blocks/mlp/fc"] == "(None, 'fsdp', 'tensor')"
    assert specs["blocks/attn/q"] == "(None, 'fsdp', 'tensor', None)"
    assert specs["wte"] == "('tensor', 'fsdp')"


def test_flops(report):
    f, cfg = report["flops"], report["model"]
    n_matmul = cfg["n_layer"] * 12 * cfg["d_model"] ** 2 + cfg["vocab_size"] * cfg["d_model"]
    assert f["matmul_params"] == n_matmul
    unmasked = 12 * cfg["n_layer"] * report["seq_len"] * cfg["d_model"]
    assert f["model_per_token"] == 6 * n_matmul + unmasked / 2  # causal attention counted once
    assert f["model_per_token_attention_unmasked"] == unmasked
    assert f["tokens_per_step"] == report["global_batch"] * report["seq_len"]
    # Without remat, the dense step's matmuls are the model FLOPs and the causal mask's half it computes anyway.
    assert math.isclose(f["step_matmul"], f["model_per_step"] + unmasked / 2 * f["tokens_per_step"], rel_tol=1e-9)
    assert f["xla_per_device"] > 0


def test_estimate_is_the_larger_roofline_bound(report):
    e, f = report["estimate"], report["flops"]
    assert e["compute_seconds"] == pytest.approx(f["step_matmul_per_device"] / f["peak_per_device"])
    assert e["memory_seconds"] == pytest.approx(e["xla_bytes_per_device"] * report["model"]["n_layer"] / 1228e9)
    assert e["step_seconds"] == max(e["compute_seconds"], e["memory_seconds"])
    assert e["mfu"] == pytest.approx(f["model_per_step"] / (e["step_seconds"] * 4 * 275e12))
    assert 0 < e["mfu"] < 1


def test_splash_compiles_for_tpu_with_the_sequence_split(tmp_path):
    """'auto' picks the Pallas splash kernel for the TPU slice (not interpret mode, not the CPU's 'blockwise'), and
    the step compiles with the sequence split over 'context' (a Mosaic custom call in the compiled TPU program)."""
    config = _tiny_config()
    config.model.attention = "auto"
    config.model.n_ctx = 256  # splash's key blocks are multiples of 128 lanes
    config.data.resolution = 16
    config.mesh.shape = (1, 2, 2, 1)  # fsdp 2, context 2: each sequence in two halves of 128
    report, compiled = compile_job.compile_train_step(config)
    assert report["model"]["attention"] == "splash" and report["model"]["attention_configured"] == "auto"
    assert report["sequence_shards"] == 2 and report["fits"] is True
    assert "tpu_custom_call" in compiled.as_text()
    config.model.attention = "dense"
    dense_report, dense = compile_job.compile_train_step(config)
    assert "tpu_custom_call" not in dense.as_text()
    assert dense_report["model"]["attention"] == "dense"


def _pod(module: str, arg: str, **model):
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "configs" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(arg)
    config.job = "compile"
    config.model.update(model)
    return config


@pytest.mark.slow
def test_igpt_xl_64x64_on_v4_1024_fits_without_remat_only_with_splash(tmp_path):
    """iGPT-XL, 4,096 tokens, no rematerialisation: splash fits a v4-1024 chip's HBM, dense attention does not."""
    splash = compile_job.run(_pod("igpt_xl", "pod=v4-1024", remat="none"), str(tmp_path / "splash"))
    assert splash["model"]["attention"] == "splash" and splash["fits"]
    with pytest.raises(compile_job.CompileError, match="RESOURCE_EXHAUSTED|more than"):
        compile_job.run(_pod("igpt_xl", "pod=v4-1024", remat="none", attention="dense"), str(tmp_path / "dense"))


@pytest.mark.slow
def test_igpt_l_96x96_fits_a_v4_2048_with_splash_and_sequence_sharding_only(tmp_path):
    """iGPT-L at 96x96 (9,216 tokens), each sequence split over 'context': splash fits, dense does not."""
    splash = compile_job.run(_pod("igpt_l", "res=96"), str(tmp_path / "splash"))
    assert splash["model"]["attention"] == "splash" and splash["fits"]
    assert splash["seq_len"] == 9216 and splash["sequence_shards"] == 2 and splash["devices"] == 1024
    with pytest.raises(compile_job.CompileError, match="RESOURCE_EXHAUSTED|more than"):
        compile_job.run(_pod("igpt_l", "res=96", attention="dense"), str(tmp_path / "dense"))


def test_too_little_memory_is_an_error(tmp_path):
    config = _tiny_config()
    config.compile.hbm_gib = 1e-4  # 100 KiB: less than the step's code
    with pytest.raises(compile_job.CompileError, match="more than 90% of"):
        compile_job.run(config, str(tmp_path))
    assert json.loads((tmp_path / "compile_report.json").read_text())["fits"] is False


def test_bad_topology_names_the_fix():
    config = _tiny_config()
    config.compile.topology = "v4"
    with pytest.raises(compile_job.CompileError, match="v4:8x8x8"):
        compile_job.describe_topology(config.compile)


def test_a_config_the_step_cannot_run_is_the_config_checks_one_line_error():
    """The job checks its config with `config.checks.validate` and the slice's device count: a -1 mesh axis is
    resolved on the slice, so micro-batches that do not split over its data-parallel size are caught."""
    config = _tiny_config()
    config.mesh.shape = (1, -1, 1)  # fsdp over the slice's 4 devices
    config.train.grad_accum_steps = 4  # micro-batches of 2 examples
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps=4 .* divisible by the data-parallel size 4"):
        compile_job.compile_train_step(config)
    config = _tiny_config()
    config.data.resolution = 16  # 256 tokens, more than model.n_ctx=64
    with pytest.raises(ConfigError, match=r"data.resolution=16 gives 256 tokens .* model.n_ctx=64"):
        compile_job.compile_train_step(config)
