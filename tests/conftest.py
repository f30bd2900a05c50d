"""Test session set-up: 8 fake CPU devices for sharding tests, absl flags parsed for Grain workers, and the shared
fixtures (a tiny pretraining run made once per session)."""

import os

# Must happen before jax is imported anywhere in the session. CPU only: with libtpu installed (for the AOT compile
# tests, which describe TPU topologies without a TPU backend) JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrained_digits_run(tmp_path_factory):
    """(data_dir, workdir) of a finished tiny pretraining run (`tiny_runs.downstream_config`), made once."""
    import jax  # noqa: PLC0415

    from igpt_jax.jobs import pretrain  # noqa: PLC0415
    from tiny_runs import downstream_config  # noqa: PLC0415

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    pretrain.run(downstream_config(data_dir), workdir, devices=jax.devices()[:1])
    return data_dir, workdir
