"""Which JAX platforms a process starts: for the entry points that own a process, never on import.

libtpu is installed beside the CPU wheel for deviceless compilation (`python -m cvt_flax.aot`, the
tests). JAX then tries to start a TPU backend in every process, and on a machine without TPU chips
libtpu writes an error block to the terminal ("Failed to find host bounds", "unexpected worker
hostname ... TPU_WORKER_HOSTNAMES") before JAX falls back to the CPU. `skip_tpu_without_chips`
sets JAX's public `jax_platforms` setting to 'cpu' there, so JAX starts only the CPU backend, in
silence. Compiling for a TPU topology (`jax.experimental.topologies`) loads libtpu by another
route and is unaffected.

It changes nothing on a machine with TPU chips or a GPU, where libtpu is not installed (and
`TPU_LIBRARY_PATH`, which a process that loaded libtpu exports to its children, is not set), or
when the user has chosen (`JAX_PLATFORMS`, `jax.config.update('jax_platforms', ...)`,
`JAX_FORCE_TPU_INIT`). `train.py`, every `python -m cvt_flax...` command and the tests'
`conftest.py` call it first; `import cvt_flax` does not, since a library must leave a user's JAX
as it finds it. A user's own script on such a machine sets `JAX_PLATFORMS=cpu`, or calls this.
"""
from __future__ import annotations

import importlib.util
import os

import jax

from cvt_flax import accelerators
from cvt_flax.errors import CvtFlaxError


def libtpu_present() -> bool:
  """Whether JAX would find libtpu and try to start it."""
  return 'TPU_LIBRARY_PATH' in os.environ or importlib.util.find_spec('libtpu') is not None


def user_chose_platforms() -> bool:
  return bool(os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms
              or 'JAX_FORCE_TPU_INIT' in os.environ)


def skip_tpu_without_chips() -> bool:
  """Starts JAX on the CPU alone where libtpu is installed on a CPU-only machine and nobody chose
  the platforms; True if it did. Call it before anything starts a JAX backend."""
  if user_chose_platforms() or not libtpu_present() or accelerators.detect() is not None:
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True


class AcceleratorNotUsed(CvtFlaxError, RuntimeError):
  """The machine has a GPU or TPU and JAX started on the CPU alone."""


def check_jax_devices() -> str:
  """Starts JAX (`skip_tpu_without_chips` first), prints one line (JAX's version, backend and
  devices, and the accelerator the OS shows) and returns it; AcceleratorNotUsed, naming the
  versions installed and the fix, where the machine has a GPU or TPU and JAX sees only CPUs (a
  notebook must not train on the CPU for an hour unnoticed), unless the user chose the platforms
  with JAX_PLATFORMS."""
  skip_tpu_without_chips()
  accelerator = accelerators.detect()
  line = (f'jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; '
          f'accelerator on this machine: {accelerator or "none"}')
  print(line, flush=True)
  if (accelerator is not None and jax.default_backend() == 'cpu'
      and not os.environ.get('JAX_PLATFORMS')):
    versions = ', '.join(f'{k} {v}' for k, v in accelerators.installed_versions().items())
    extra = accelerators.JAX_EXTRA.get(accelerator)
    fix = (f"pip install 'cvt-flax[{extra}]' (in Colab: run the setup cell), then restart the "
           'runtime' if extra else "install JAX's ROCm build as JAX's install guide says, then "
           'restart')
    raise AcceleratorNotUsed(
        f'this machine has a {accelerator.upper()} accelerator but JAX runs on the CPU only '
        f'({versions}): its {accelerator} backend did not start (see the warning above). '
        f'Fix: {fix}.')
  return line


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ INFO and WARNING lines (tf.data's 'Local rendezvous is aborting' for
  each image that fails to decode, CPU feature notes) off a command's stderr, where cvt-flax says
  what went wrong in its own one line. Before TensorFlow is imported. `import jax` sets '1' (INFO
  off) where nothing was set, so '1' counts as unset; a user's '0' or '3' stands."""
  if os.environ.get('TF_CPP_MIN_LOG_LEVEL', '1') == '1':
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
