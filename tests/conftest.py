"""Test session set-up: 8 fake CPU devices for sharding tests, a persistent compilation cache for the whole session,
absl flags parsed for Grain workers, and the shared fixtures (the digits dataset prepared once, a tiny pretraining run
made once per session, and its probe and fine-tuning jobs)."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the session. CPU only: with libtpu installed (for the AOT compile
# tests, which describe TPU topologies without a TPU backend) JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's backend optimisation takes most of XLA:CPU's compile time, and the tests' tiny models run for milliseconds:
# compile at level 0 (the comparisons are between programs compiled alike, and with the level-0 flag the committed
# legacy workdir still resumes to its recorded losses bit for bit). Subprocesses inherit both flags.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent compilation cache for the session, inherited by every subprocess the tests start (the CLI, signal
# and multi-process tests): a program compiled once (the tiny models' train steps recur in dozens of tests and
# processes) is loaded from disk afterwards. Identical programs give identical executables, so bit-exact comparisons
# are unaffected. A developer may point JAX_COMPILATION_CACHE_DIR at a lasting folder to reuse it across runs.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache_dir = tempfile.mkdtemp(prefix="igpt_jax_test_compilation_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the embedded 8x8 digits and their 16-colour palette, prepared once per session."""
    from tiny_runs import pretrain_config  # noqa: PLC0415

    from igpt_jax.data import palette_cache  # noqa: PLC0415

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    palette_cache.load_or_fit_palette(pretrain_config(data_dir).data)  # imports the digits, fits the palette
    return data_dir


@pytest.fixture
def digits_cfg(digits_data_dir):
    """A fresh data config of the session's digits (its tests may change it)."""
    from igpt_jax.data.config import default_data_config  # noqa: PLC0415

    cfg = default_data_config("digits")
    cfg.data_dir = digits_data_dir
    return cfg


@pytest.fixture(scope="session")
def pretrained_digits_run(digits_data_dir, tmp_path_factory):
    """(data_dir, workdir) of a finished tiny pretraining run (`tiny_runs.downstream_config`), made once."""
    import jax  # noqa: PLC0415
    from tiny_runs import downstream_config  # noqa: PLC0415

    from igpt_jax.jobs import pretrain  # noqa: PLC0415

    workdir = str(tmp_path_factory.mktemp("pretrain"))
    pretrain.run(downstream_config(digits_data_dir), workdir, devices=jax.devices()[:1])
    return digits_data_dir, workdir


@pytest.fixture(scope="session")
def probe_results(pretrained_digits_run, tmp_path_factory):
    """(config, workdir, results) of the probe job on the shared run: both checkpoints, concatenation, low data."""
    import jax  # noqa: PLC0415
    from tiny_runs import PRETRAIN_STEPS, probe_config  # noqa: PLC0415

    from igpt_jax.jobs import probe  # noqa: PLC0415

    config = probe_config(pretrained_digits_run, checkpoint_steps=(PRETRAIN_STEPS // 2, PRETRAIN_STEPS),
                          concat_layers=2, low_data_budgets=(20,), low_data_subsets=2, C=(0.01, 1.0, 100.0),
                          solver="lbfgs", C_widen=0)
    workdir = tmp_path_factory.mktemp("probe")
    return config, workdir, probe.run(config, str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def finetune_results(pretrained_digits_run, tmp_path_factory):
    """(workdir, results) of the fine-tuning job on the shared run (`tiny_runs.finetune_config`)."""
    import jax  # noqa: PLC0415
    from tiny_runs import finetune_config  # noqa: PLC0415

    from igpt_jax.jobs import finetune  # noqa: PLC0415

    workdir = tmp_path_factory.mktemp("finetune")
    return workdir, finetune.run(finetune_config(pretrained_digits_run), str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def bench_script():
    """Loads a script of bench/ (a folder of scripts, not a package) as a module: ``bench_script('accelerator')``."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
