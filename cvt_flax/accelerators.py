"""The accelerators this machine has, as the OS shows them, and the JAX build that runs on them.

Standard library only, without JAX: `cvt_flax.runtime.platforms` reads it before JAX starts a
backend, and a notebook's setup cell runs this file (`install`) before cvt-flax, or the JAX that
matches the runtime, is installed.

  TPU     Google (PCI vendor 0x1ae0) devices with a TPU's device id, the table JAX itself keeps
          (`jax._src.hardware_utils`: v3 ... TPU7x), or /dev/accel* (the TPU driver of v2-v4 VMs).
          Google's other PCI devices (the gVNIC network card) are not TPUs.
  NVIDIA  /dev/nvidia0, /dev/nvidiactl (containers), /dev/dxg (WSL2) or /proc/driver/nvidia/gpus/*.
  AMD     /dev/kfd (the ROCm kernel driver).
"""
from __future__ import annotations

import glob
from importlib import metadata
import os
import subprocess
import sys

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


# --------------------------------------------------------------------------------------------------
# Installing the JAX build of this machine's accelerator (a notebook's setup cell, in Colab).

# The cvt-flax extra that brings JAX's build for each accelerator (pyproject.toml): `jax[cuda12]`
# (the CUDA plugin and CUDA's wheels, at jax's own version) and `jax[tpu]` (libtpu). None for AMD:
# JAX's ROCm build is installed by hand, after ROCm's own instructions.
JAX_EXTRA = {NVIDIA: 'cuda', TPU: 'tpu'}
# The distributions whose versions must agree for JAX to start its accelerator backend.
JAX_DISTRIBUTIONS = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin',
                     'jax-cuda13-pjrt', 'libtpu')


class RestartRuntime(RuntimeError):
  """The kernel holds a JAX other than the one now installed: only a restart loads the new one."""


def pip_requirement(package: str, accelerator: str | None, extras=()) -> str:
  """What pip installs for cvt-flax from `package` (a directory or a name) with `extras`, plus the
  extra of `accelerator`'s JAX build."""
  extras = list(extras) + ([JAX_EXTRA[accelerator]] if accelerator in JAX_EXTRA else [])
  return f'{package}[{",".join(extras)}]' if extras else package


def restart_message(kernel_jax: str | None, installed_jax: str | None) -> str | None:
  """Why the runtime must be restarted, or None: the kernel imported JAX `kernel_jax` (None: not
  imported) before the install left `installed_jax` on disk."""
  if kernel_jax is None or kernel_jax == installed_jax:
    return None
  return (f'This kernel imported jax {kernel_jax} before the setup installed jax {installed_jax}: '
          'restart the runtime (in Colab: the Runtime menu, restart), then run the notebook again '
          'from the top.')


def installed_versions() -> dict[str, str]:
  """The installed version of each of JAX_DISTRIBUTIONS that is installed."""
  found = {}
  for name in JAX_DISTRIBUTIONS:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return found


def install(package: str = './cvt-flax', *extras: str) -> str:
  """Installs cvt-flax from `package` (a clone's directory, './' first, or a pip name) with
  `extras` and the JAX build of this machine's accelerator, in this Python; raises RestartRuntime
  if this process had imported another JAX. Returns the requirement installed. Standard library
  only: a setup cell runs this file before cvt-flax is installed:

      runpy.run_path('cvt-flax/cvt_flax/accelerators.py')['install']('./cvt-flax', 'train')
  """
  accelerator = detect()
  kernel_jax = getattr(sys.modules.get('jax'), '__version__', None)
  requirement = pip_requirement(package, accelerator, extras)
  print(f'runtime accelerator: {accelerator or "none (CPU)"}; pip install {requirement}',
        flush=True)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', requirement], check=True)
  message = restart_message(kernel_jax, installed_versions().get('jax'))
  if message:
    raise RestartRuntime(message)
  return requirement
