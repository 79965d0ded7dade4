"""Keeps JAX from starting the TPU runtime on a machine that has no TPU chips.

libtpu is installed beside the CPU wheel for deviceless compilation (`python -m cvt_flax.aot`,
the tests). JAX then tries to start a TPU backend in every process, and on a machine without TPU
chips libtpu writes an error block to the terminal ("Failed to find host bounds", "unexpected
worker hostname ... TPU_WORKER_HOSTNAMES") before JAX falls back to the CPU. Where no TPU chip is
on the PCI bus, the TPU backend's factory is replaced by one that declines at once, so JAX moves
on to the other backends in silence. Compiling for a TPU topology (`jax.experimental.topologies`)
loads libtpu by another route and is unaffected. Nothing changes on a TPU VM (chips present),
or when the user has chosen platforms (`JAX_PLATFORMS`) or forced TPU start-up
(`JAX_FORCE_TPU_INIT`). It applies whether or not this environment has libtpu: a process that has
loaded libtpu exports `TPU_LIBRARY_PATH` to its children, whose JAX then loads that library too.
"""
from __future__ import annotations

import os

import jax
from jax.extend import backend as jax_backend

try:  # JAX's own probe for TPU chips; private, so a JAX without it changes nothing here
  from jax._src import hardware_utils
except ImportError:
  hardware_utils = None

# The priority JAX gives its own TPU factory (jax._src.xla_bridge), kept so the order is unchanged.
_TPU_PRIORITY = 300


def tpu_chips_on_this_machine() -> int:
  """TPU chips on the PCI bus, as JAX counts them (Google's vendor id under /sys/bus/pci)."""
  if hardware_utils is None:
    return 1  # assume chips, i.e. change nothing
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def _no_tpu_here():
  raise RuntimeError('no TPU chips on this machine (cvt_flax.runtime.tpu_backend)')


def skip_tpu_backend_without_chips() -> bool:
  """Replaces the TPU backend factory when it cannot find a TPU; True if it did."""
  if (os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms
      or 'JAX_FORCE_TPU_INIT' in os.environ or tpu_chips_on_this_machine() > 0):
    return False
  try:
    jax_backend.register_backend_factory('tpu', _no_tpu_here, priority=_TPU_PRIORITY,
                                         fail_quietly=True)
  except RuntimeError:  # backends already started: too late to change anything
    return False
  return True
