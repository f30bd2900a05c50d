"""A quiet start on machines without a TPU: JAX is kept from initialising libtpu where no TPU chip is attached.

With libtpu installed (the compile job needs it to describe TPU slices), JAX tries the TPU backend first in every
process, and on a CPU machine that prints libtpu's errors at start: "Unable to initialize backend 'tpu' ... libtpu
multi-process lockfile" when another JAX process holds /tmp/libtpu_lockfile, or "could not determine TPU accelerator
type ... unexpected worker hostname" from libtpu's C++ start-up otherwise. When no TPU chip is on the PCI bus (JAX's
own test, in jax._src.hardware_utils) and no NVIDIA GPU is visible, `skip_absent_tpu` sets JAX_PLATFORMS=cpu, the
backend JAX would fall back to anyway. An explicit JAX_PLATFORMS (or JAX_FORCE_TPU_INIT) is left alone. Describing a
TPU topology for the compile job (`jax.experimental.topologies.get_topology_desc`) does not need the TPU backend.
"""

from __future__ import annotations

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # every Cloud TPU chip
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_attached() -> bool:
    """True when a Google accelerator is on the PCI bus (or an /dev/accel* device exists): a TPU VM."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_path) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def skip_absent_tpu(environ=os.environ) -> bool:
    """Sets JAX_PLATFORMS=cpu when libtpu would only fail here; returns whether it did.

    Must run before JAX starts a backend (importing jax is fine; the first device query is not).
    """
    if environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in environ:
        return False
    if tpu_attached() or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # jax read its environment at import: tell its config too
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True
