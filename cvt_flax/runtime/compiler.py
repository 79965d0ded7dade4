"""Compiling a CvT computation: every jit in cvt-flax goes through `jit` (and `compile_ahead`), so
that none can miss the platform's compiler options or, on CPU, the release of the compiler's memory.

  jit             `jax.jit` with the platform's XLA options (`cvt_flax.models.cpu.COMPILER_OPTIONS`)
  compile_ahead   jit, lower and compile for abstract arguments; on CPU, then frees the compiler's
                  heap
  cost_analysis   XLA's cost analysis of a compiled executable as one dict
"""
from __future__ import annotations

from typing import Any

import jax

from cvt_flax.models import cpu


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
  """XLA options for a CvT computation on `platform` (default: JAX's default backend); None =
  XLA's defaults."""
  return dict(cpu.COMPILER_OPTIONS) if _is_cpu(platform) else None


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
    cpu.release_freed_memory()
  return compiled
