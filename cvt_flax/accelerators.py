"""The accelerators this machine has, as the OS shows them, without importing JAX.

Standard library only: `cvt_flax.runtime.platforms` reads it before JAX starts a backend, and a
notebook's setup cell runs `cvt_flax/colab.py`, which reads it, before cvt-flax or a matching JAX is
installed.

  TPU     Google (PCI vendor 0x1ae0) devices with a TPU's device id, the table JAX itself keeps
          (`jax._src.hardware_utils`: v3 ... TPU7x), or /dev/accel* (the TPU driver of v2-v4 VMs).
          Google's other PCI devices (the gVNIC network card) are not TPUs.
  NVIDIA  /dev/nvidia0, /dev/nvidiactl (containers), /dev/dxg (WSL2) or /proc/driver/nvidia/gpus/*.
  AMD     /dev/kfd (the ROCm kernel driver).
"""
from __future__ import annotations

import glob
import os

TPU, NVIDIA, AMD = 'tpu', 'nvidia', 'amd'

_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')
_NVIDIA_DEVICE_FILES = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg')


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ''


def tpu_chips(root: str = '/') -> int:
  """TPU chips on this machine's PCI bus (0 on anything but a TPU VM)."""
  pci = os.path.join(root, 'sys/bus/pci/devices')
  chips = sum(1 for device in glob.glob(os.path.join(pci, '*'))
              if _read(os.path.join(device, 'vendor')) == _GOOGLE_PCI_VENDOR
              and _read(os.path.join(device, 'device')) in _TPU_PCI_DEVICES)
  return chips or len(glob.glob(os.path.join(root, 'dev/accel[0-9]*')))


def has_nvidia_gpu(root: str = '/') -> bool:
  return (any(os.path.exists(os.path.join(root, f.lstrip('/'))) for f in _NVIDIA_DEVICE_FILES)
          or bool(glob.glob(os.path.join(root, 'proc/driver/nvidia/gpus/*'))))


def has_amd_gpu(root: str = '/') -> bool:
  return os.path.exists(os.path.join(root, 'dev/kfd'))


def detect(root: str = '/') -> str | None:
  """The accelerator on this machine: TPU, NVIDIA, AMD, or None for none (a CPU machine).
  `root` is the file system's root, for tests."""
  if tpu_chips(root):
    return TPU
  if has_nvidia_gpu(root):
    return NVIDIA
  if has_amd_gpu(root):
    return AMD
  return None
