"""What the TPU kernels share: 2-D block matmuls, masks for blocks that run past an array's end,
byte counts for cost estimates, and the `pallas_call` itself."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
# dot_general contractions of two 2-D blocks: a @ b.T, a.T @ b, a @ b
NT, TN, NN = ((1,), (1,)), ((0,), (0,)), ((1,), (0,))
# What a kernel's working set may take of VMEM: a v4 core has 16 MiB (v5p and TPU7x 64, v5e and
# v6e 128 MiB; Pallas's `tpu_info`), and the step must compile on all; the rest is left to
# Mosaic's own.
VMEM_BUDGET = 14 * 2 ** 20


def dot(a, b, contract):
  """A matmul of two 2-D blocks, accumulated in float32."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32)


def rows_valid(rows: int, start, count: int):
  """Of a (rows, n) block starting at row `start`, which rows lie before `count`: (rows, 1)."""
  return start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < count


def zero_outside(x, valid):
  return jnp.where(valid, x, jnp.zeros_like(x))


def nbytes(*arrays) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def call(kernel, grid, semantics, in_specs, out_specs, scratch, out_shape, cost, interpret, *args):
  """`kernel` over `grid` (`semantics`: 'parallel' or 'arbitrary' per axis), compiled by Mosaic,
  or run by Pallas's TPU interpreter (any backend) where `interpret`."""
  return pl.pallas_call(
      kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=pltpu.InterpretParams() if interpret else False, cost_estimate=cost)(*args)

