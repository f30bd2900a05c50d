"""Test session set-up: 8 fake CPU devices for sharding tests, and absl flags parsed for Grain workers."""

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
