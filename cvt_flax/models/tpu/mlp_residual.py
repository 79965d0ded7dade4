"""The second half of a transformer block, `x + drop_path(mlp(layer_norm(x)))`, as Pallas
(Mosaic) kernels for TPU that keep the normalised tokens and the MLP's hidden layer in VMEM.

XLA computes the MLP as separate matmuls and keeps the hidden layer (4x the width of the tokens)
in HBM: written in the forward pass, read back by the backward pass, and its gradient written and
read again; the LayerNorm before it and the residual add after it are passes of their own. Per
token that is about 30 token-widths of traffic. Here the forward kernel reads a block of the
residual stream and writes the block's output: two. The backward kernel reads the block and its
output gradient, recomputes the LayerNorm and the hidden layer (one more matmul of the six a
train step does for the MLP), and writes the input gradient: three. The weight gradients
accumulate in VMEM over the whole grid, and the weights stay there for the whole call.

Stochastic depth enters as one scale per image (0 or 1/keep, 1 when inactive), read from SMEM.

Blocks are whole rows of one image's tokens, at most MAX_BLOCK_ROWS of them, sized so the tokens
split into equal blocks (3,136 = 7 x 448, 784 = 2 x 392, 197 -> 200): little of the last block
runs past the end. Rows past the end are zeroed before they reach the weight gradients and are
never written. Matmuls take the inputs' dtype and accumulate in float32; the LayerNorm, the
activation and the residual add run in float32.

The weight gradients accumulate across the whole grid, so its axes are 'arbitrary' (one
TensorCore). `fits` says whether a layer's weights and their gradients fit in VMEM; larger layers
(CvT-W24's last stage) take XLA's path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models import norms
from cvt_flax.models.tpu.blocks import (F32, NN, NT, TN, VMEM_BUDGET, call, dot, nbytes,
                                        rows_valid, zero_outside)

MAX_BLOCK_ROWS = 512
_SEMANTICS = ('arbitrary', 'arbitrary')


def block_rows(tokens: int) -> int:
  """Rows per block: the tokens in equal blocks of at most MAX_BLOCK_ROWS, rounded up to 16, the
  rows of a bfloat16 tile (TPU7x's XLA lays bfloat16 arrays out in (16, 128) tiles, and Mosaic
  refuses a block of 392 rows of them; earlier generations took multiples of 8)."""
  blocks = pl.cdiv(tokens, MAX_BLOCK_ROWS)
  return 16 * pl.cdiv(pl.cdiv(tokens, blocks), 16)


def fits(tokens: int, width: int, hidden: int, itemsize: int) -> bool:
  """Whether the backward kernel's working set for these shapes fits in VMEM_BUDGET."""
  weights = 2 * width * hidden * (itemsize + 4)  # two matrices, as inputs and float32 gradients
  block = block_rows(tokens) * (3 * hidden * 4 + 6 * width * itemsize)
  return weights + block <= VMEM_BUDGET


def _rows(b, n):
  return b * pl.cdiv(n, block_rows(n)) * block_rows(n)


def forward_cost(x, scale, norm_scale, norm_bias, w1, b1, w2, b2, out) -> pl.CostEstimate:
  """Two matmuls per row (padding included); the weights are read once."""
  rows, (width, hidden) = _rows(*x.shape[:2]), w1.shape
  return pl.CostEstimate(flops=4 * rows * width * hidden, transcendentals=rows * (hidden + 1),
                         bytes_accessed=nbytes(x, scale, norm_scale, norm_bias, w1, b1, w2, b2,
                                               out))


def backward_cost(x, grad, scale, norm_scale, norm_bias, w1, b1, w2, *grads) -> pl.CostEstimate:
  """Five matmuls per row: fc1 again, the gradients of both weights, the hidden layer's and the
  normalised input's. `grads`: dx, then the parameters' gradients."""
  rows, (width, hidden) = _rows(*x.shape[:2]), w1.shape
  return pl.CostEstimate(flops=10 * rows * width * hidden, transcendentals=rows * (hidden + 1),
                         bytes_accessed=nbytes(x, grad, scale, norm_scale, norm_bias, w1, b1, w2,
                                               *grads))


def _normalise(x, norm_scale, norm_bias, epsilon):
  """LayerNorm of a block's rows: (normalised, 1/std per row, the output in x's dtype)."""
  normalised, rstd = norms.normalise_rows(x.astype(F32), epsilon)
  return normalised, rstd, (normalised * norm_scale + norm_bias).astype(x.dtype)


def _forward_kernel(scale_ref, x_ref, norm_scale_ref, norm_bias_ref, w1_ref, b1_ref, w2_ref,
                    b2_ref, out_ref, *, activation, epsilon):
  x = x_ref[...]
  _, _, normed = _normalise(x, norm_scale_ref[...], norm_bias_ref[...], epsilon)
  hidden = activation(dot(normed, w1_ref[...], NN) + b1_ref[...])
  branch = dot(hidden.astype(w2_ref.dtype), w2_ref[...], NN) + b2_ref[...]
  out_ref[...] = (x.astype(F32) + scale_ref[pl.program_id(0)] * branch).astype(out_ref.dtype)


def _backward_kernel(scale_ref, x_ref, grad_ref, norm_scale_ref, norm_bias_ref, w1_ref, b1_ref,
                     w2_ref, dx_ref, d_norm_scale_ref, d_norm_bias_ref, dw1_ref, db1_ref, dw2_ref,
                     db2_ref, *, activation, epsilon, tokens):
  image, block = pl.program_id(0), pl.program_id(1)
  sums = (d_norm_scale_ref, d_norm_bias_ref, dw1_ref, db1_ref, dw2_ref, db2_ref)

  @pl.when((image == 0) & (block == 0))
  def _():
    for ref in sums:
      ref[...] = jnp.zeros(ref.shape, F32)

  rows = x_ref.shape[0]
  valid = rows_valid(rows, block * rows, tokens)
  # Rows past the end hold whatever followed in VMEM: zero them before they reach a sum.
  x, grad = zero_outside(x_ref[...], valid), zero_outside(grad_ref[...], valid)
  norm_scale = norm_scale_ref[...]
  normalised, rstd, normed = _normalise(x, norm_scale, norm_bias_ref[...], epsilon)
  hidden, activation_vjp = jax.vjp(activation, dot(normed, w1_ref[...], NN) + b1_ref[...])
  d_branch = grad.astype(F32) * scale_ref[image]
  d_branch_c = d_branch.astype(x.dtype)
  dw2_ref[...] += dot(hidden.astype(x.dtype), d_branch_c, TN)
  db2_ref[...] += jnp.sum(d_branch, axis=0, keepdims=True)
  (d_pre,) = activation_vjp(dot(d_branch_c, w2_ref[...], NT))
  db1_ref[...] += jnp.sum(d_pre, axis=0, keepdims=True)
  d_pre = d_pre.astype(x.dtype)
  dw1_ref[...] += dot(normed, d_pre, TN)
  d_normed = dot(d_pre, w1_ref[...], NT)
  d_norm_scale_ref[...] += jnp.sum(d_normed * normalised, axis=0, keepdims=True)
  d_norm_bias_ref[...] += jnp.sum(d_normed, axis=0, keepdims=True)
  d_x = norms.normalise_rows_grad(normalised, rstd, d_normed * norm_scale)
  dx_ref[...] = (grad.astype(F32) + d_x).astype(dx_ref.dtype)


def _specs(x, w1):
  """Block specs: the tokens, the per-image scale (SMEM), and the parameters (whole)."""
  (_, n, width), hidden = x.shape, w1.shape[1]
  tokens = pl.BlockSpec((None, block_rows(n), width), lambda i, j: (i, j, 0))
  # The same block all along: fetched (or written back) once, so one buffer, not the pipeline's two.
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0), pipeline_mode=pl.Buffered(1))
  row = lambda size: whole((1, size))
  scale = pl.BlockSpec(memory_space=pltpu.SMEM)
  return tokens, scale, (row(width), row(width), whole((width, hidden)), row(hidden),
                         whole((hidden, width)), row(width))


def _grid(x):
  return x.shape[0], pl.cdiv(x.shape[1], block_rows(x.shape[1]))


def _forward(x, scale, params, activation, epsilon, interpret):
  tokens, scale_spec, param_specs = _specs(x, params[2])
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  kernel = functools.partial(_forward_kernel, activation=activation, epsilon=epsilon)
  return call(kernel, _grid(x), _SEMANTICS, [scale_spec, tokens, *param_specs], tokens, [], out,
              forward_cost(x, scale, *params, out), interpret, scale, x, *params)


def _backward(x, grad, scale, params, activation, epsilon, interpret):
  tokens, scale_spec, param_specs = _specs(x, params[2])
  f32 = lambda a: jax.ShapeDtypeStruct(a.shape, F32)
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), *(f32(p) for p in params))
  kernel = functools.partial(_backward_kernel, activation=activation, epsilon=epsilon,
                             tokens=x.shape[1])
  return call(kernel, _grid(x), _SEMANTICS, [scale_spec, tokens, tokens, *param_specs[:-1]],
              [tokens, *param_specs], [], outs, backward_cost(x, grad, scale, *params[:-1], *outs),
              interpret, scale, x, grad, *params[:-1])


def _kernel_params(dtype, norm_scale, norm_bias, w1, b1, w2, b2):
  """The matrices in the compute dtype (as `nnx.Linear` uses them), vectors as float32 rows."""
  row = lambda v: v.astype(F32)[None]
  return (row(norm_scale), row(norm_bias), w1.astype(dtype), row(b1), w2.astype(dtype), row(b2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def fused_mlp_block(x, scale, norm_scale, norm_bias, w1, b1, w2, b2, activation, epsilon,
                    interpret=False):
  """`x + scale * mlp(layer_norm(x))` for (batch, tokens, width) `x` (in x's dtype), where
  `mlp(y) = activation(y @ w1 + b1) @ w2 + b2` and `scale` is (batch,) float32, stochastic depth's
  per-image factor (no gradient flows into it).

  `activation`: an elementwise function (jax-traceable, Mosaic-lowerable). `epsilon`: the
  LayerNorm's. `interpret`: run in Pallas's TPU interpreter (any backend) instead of compiling
  with Mosaic."""
  return _fused_forward(x, scale, norm_scale, norm_bias, w1, b1, w2, b2, activation, epsilon,
                        interpret)[0]


def _fused_forward(x, scale, norm_scale, norm_bias, w1, b1, w2, b2, activation, epsilon,
                   interpret):
  params = _kernel_params(x.dtype, norm_scale, norm_bias, w1, b1, w2, b2)
  out = _forward(x, scale, params, activation, epsilon, interpret)
  return out, (x, scale, norm_scale, norm_bias, w1, b1, w2, b2)


def _fused_backward(activation, epsilon, interpret, residuals, grad):
  x, scale, *raw = residuals
  params = _kernel_params(x.dtype, *raw)
  dx, *param_grads = _backward(x, grad, scale, params, activation, epsilon, interpret)
  return (dx, jnp.zeros_like(scale), *(g[0] if p.ndim == 1 else g
                                        for g, p in zip(param_grads, raw)))


fused_mlp_block.defvjp(_fused_forward, _fused_backward)
