"""Which JAX platforms a process starts: for the entry points that own a process, never on import.

An accelerator's JAX plugin may be installed on a machine without that accelerator, for
deviceless compilation (`python -m cvt_flax.aot`, the tests): libtpu (`[tpu]`, `[test]`) and
JAX's CUDA plugin (`[gpu-aot]`, `[cuda]`). JAX then tries to start its backend in every process:
libtpu writes an error block to the terminal ("Failed to find host bounds", "unexpected worker
hostname ... TPU_WORKER_HOSTNAMES"), the CUDA plugin a "Jax plugin configuration error ...
Unable to load CUDA" traceback, before JAX falls back to the CPU. `cpu_only_without_accelerator`
sets JAX's public `jax_platforms` setting to 'cpu' there, so JAX starts only the CPU backend, in
silence. Compiling for a TPU or GPU topology (`jax.experimental.topologies`) still works: libtpu
is loaded by another route, and the CUDA plugin registers itself (it skips only its check of the
CUDA libraries, which a machine without a GPU lacks). What this cannot silence: the CUDA plugin's
libraries also print "Could not find cuda drivers" lines when `jax` is imported, before any
cvt-flax code runs; hence `make install` keeps the plugin out of `.venv` (in `.venv/gpu-aot`).

It changes nothing on a machine with TPU chips or a GPU, where no such plugin is installed, or
when the user has chosen (`JAX_PLATFORMS`, `jax.config.update('jax_platforms', ...)`,
`JAX_FORCE_TPU_INIT`). `train.py`, every `python -m cvt_flax...` command and the tests'
`conftest.py` call it first; `import cvt_flax` does not, since a library must leave a user's JAX
as it finds it. A user's own script on such a machine sets `JAX_PLATFORMS=cpu`, or calls this.
"""
from __future__ import annotations

import importlib.util
import os

import jax

from cvt_flax import accelerators, logs
from cvt_flax.errors import CvtFlaxError
from cvt_flax.models import compute


# What JAX's CUDA plugin writes to stderr as JAX starts on a machine without a GPU, whatever the
# platforms: each NVIDIA library it loads finds no driver. Nothing is wrong; JAX runs on the CPU.
CUDA_WITHOUT_GPU_NOISE = ('cudart_stub.cc', 'All log messages before absl::InitializeLog()')


def cuda_plugin_present() -> bool:
  return importlib.util.find_spec('jax_cuda12_plugin') is not None


def accelerator_plugin_present() -> bool:
  """Whether JAX would find libtpu or its CUDA plugin and try to start it."""
  return ('TPU_LIBRARY_PATH' in os.environ or importlib.util.find_spec('libtpu') is not None
          or cuda_plugin_present())


def user_chose_platforms() -> bool:
  return bool(os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms
              or 'JAX_FORCE_TPU_INIT' in os.environ)


def cpu_only_without_accelerator() -> bool:
  """Starts JAX on the CPU alone where an accelerator's plugin is installed on a CPU-only machine
  and nobody chose the platforms; True if it did. Call it before anything starts a JAX backend."""
  if (user_chose_platforms() or not accelerator_plugin_present()
      or accelerators.detect() is not None):
    return False
  jax.config.update('jax_platforms', 'cpu')
  if cuda_plugin_present():
    with logs.native_stderr_without(*CUDA_WITHOUT_GPU_NOISE):
      jax.devices()  # JAX starts here, the plugin's lines kept off the terminal
  return True


# bf16 tensor cores: NVIDIA's from Ampere (sm_80) on. A T4 (sm_75) has none: XLA runs its bf16
# matmuls as float32 ones with conversions around them, and a CvT-13 step is estimated no faster
# than in float32 (benchmarks/RESULTS.md).
BF16_MIN_GPU_CAPABILITY = 8.0


def fast_dtype() -> str:
  """The compute dtype to train in on JAX's default device: 'bfloat16' on a TPU or a GPU with
  bf16 tensor cores (A100, L4, H100), else 'float32' (a CPU, a T4)."""
  if jax.default_backend() == 'tpu':
    return 'bfloat16'
  capability = compute.gpu_capability(compute.Compute())
  fast = capability is not None and capability >= BF16_MIN_GPU_CAPABILITY
  return 'bfloat16' if fast else 'float32'


class AcceleratorNotUsed(CvtFlaxError, RuntimeError):
  """The machine has a GPU or TPU and JAX started on the CPU alone."""


def check_jax_devices() -> str:
  """Starts JAX (`cpu_only_without_accelerator` first), prints one line (JAX's version, backend and
  devices, and the accelerator the OS shows) and returns it; AcceleratorNotUsed, naming the
  versions installed and the fix, where the machine has a GPU or TPU and JAX sees only CPUs (a
  notebook must not train on the CPU for an hour unnoticed), unless the user chose the platforms
  with JAX_PLATFORMS."""
  cpu_only_without_accelerator()
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
