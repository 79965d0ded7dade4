"""Compiling a CvT computation: every jit in cvt-flax goes through `jit` (and `compile_ahead`), so
that none can miss the platform's compiler options or, on CPU, the release of the compiler's memory.

  COMPILER_OPTIONS       XLA:CPU's scheduler and library choices for CvT
  DEVICELESS_GPU_OPTIONS XLA:GPU's, compiling for a GPU without one
  release_freed_memory   glibc's heap back to the OS after a compile
  jit             `jax.jit` with the platform's XLA options (`COMPILER_OPTIONS` on CPU)
  compile_ahead   jit, lower and compile for abstract arguments; on CPU, then frees the compiler's
                  heap
  cost_analysis   XLA's cost analysis of a compiled executable as one dict
"""
from __future__ import annotations

import ctypes
from typing import Any

import jax

# XLA:CPU's default scheduler computes values early and keeps them alive: in CvT's training step
# it materialises the depthwise convolutions' shifted input windows in the forward pass and holds
# them until the backward pass reads them. The memory-optimised scheduler does not (the memory it
# saves: benchmarks/RESULTS.md). Same computation, same numbers.
#
# Which ops XLA:CPU hands to the YNNPACK library is a default that differs between XLA builds and
# CPUs; here it is stated. Its reductions, not XLA's own loops: CvT's training step is full of
# column reductions (bias, LayerNorm and BatchNorm gradients, BatchNorm batch statistics), which
# XLA's emitter runs far slower (the step took twice as long without them). Its matmuls and
# convolutions, no: XLA's own (Eigen) run the step's GEMMs and the patch embeddings' weight
# gradients faster (benchmarks/RESULTS.md). A reduction that consumes a dot may still take the dot
# into its YNNPACK fusion.
COMPILER_OPTIONS = {
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE',
}


def release_freed_memory() -> None:
  """Returns memory that the process freed (e.g. the compiler's, after a compile) to the OS.

  glibc keeps freed small allocations in its heap; XLA's compilation of a CvT-13 training step
  leaves a sizeable part of its memory there (benchmarks/RESULTS.md), which would otherwise count
  towards the process's peak memory for the whole run. A no-op where glibc's `malloc_trim` is not
  available.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass



# XLA:GPU compiling for a GPU this process does not run on (`python -m cvt_flax.aot`): it cannot
# autotune, and its Triton GEMM fusions then fail to compile ("Couldn't find output tile sizes"),
# so cuBLAS takes every matmul. Never for a GPU the process runs on, which autotunes.
DEVICELESS_GPU_OPTIONS = {'xla_gpu_enable_triton_gemm': False}
_GPU_PLATFORMS = ('gpu', 'cuda')


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
  """XLA options for a CvT computation on `platform` (default: JAX's default backend); None =
  XLA's defaults."""
  if _is_cpu(platform):
    return dict(COMPILER_OPTIONS)
  if platform in _GPU_PLATFORMS and jax.default_backend() not in _GPU_PLATFORMS:
    return dict(DEVICELESS_GPU_OPTIONS)
  return None


def _is_cpu(platform: str | None) -> bool:
  return (platform or jax.default_backend()) == 'cpu'


def jit(fn, *, platform: str | None = None, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` with the compiler options of `platform` (default: JAX's)."""
  return jax.jit(fn, compiler_options=compiler_options(platform), **jit_kwargs)


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled executable ('flops', 'bytes accessed', ...) for one device:
  a dict whatever the jax version (older ones return a list of one dict per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return cost or {}


def compile_ahead(fn, *abstract_args, platform: str | None = None, **jit_kwargs):
  """`jit(fn).lower(*abstract_args).compile()`; on CPU the compiler's freed heap then goes back to
  the OS, before the computation's own buffers come on top of it."""
  compiled = jit(fn, platform=platform, **jit_kwargs).lower(*abstract_args).compile()
  if _is_cpu(platform):
    release_freed_memory()
  return compiled
