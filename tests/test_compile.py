"""The compile job: the pretraining step compiled ahead of time for a described TPU slice (needs libtpu; no TPU)."""

import json
import math

import pytest

pytest.importorskip("libtpu", reason="the compile job needs libtpu (pip install libtpu) to describe TPU slices")

from igpt_jax import config_checks, config_defaults  # noqa: E402
from igpt_jax.jobs import compile as compile_job  # noqa: E402

TOPOLOGY = "v4:2x2x1"  # 4 chips, one JAX device each (megacore), one host


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
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
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
    assert f["model_per_token"] == 6 * n_matmul + 12 * cfg["n_layer"] * report["seq_len"] * cfg["d_model"]
    assert f["tokens_per_step"] == report["global_batch"] * report["seq_len"]
    # Without remat and with dense attention the step's matmuls are exactly the model FLOPs.
    assert math.isclose(f["step_matmul"], f["model_per_step"], rel_tol=1e-9)
    assert f["xla_per_device"] > 0


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
