"""The model's normalisation layers, with PyTorch's semantics: BatchNorm (the convolutional
projections') and LayerNorm (everything else), each a `jax.custom_vjp` with the closed-form
gradient.

Autodiff of the textbook formulas derives the backward pass term by term, with float32
intermediates between its passes. The closed forms keep only the input for the backward pass and
recompute the statistics from it there:
- LayerNorm normalises each token over its channels, so its statistics never leave the token's row:
  the backward pass is one elementwise pass (plus the scale and bias gradients' sums).
- BatchNorm's backward pass is one reduction pass over the input and the output gradient (the
  scale and bias gradients are those two sums; on a mesh, one all-reduce for a block's three
  projections) and one elementwise pass.
On the CvT-13 TPU step they move 4.1 GB (LayerNorm) and 1.0 GB (BatchNorm) less per chip
(benchmarks/RESULTS.md).

BatchNorm's forward statistics stay the two passes, `mean(x)` then `mean((x - mean)^2)`. A one-pass
form (a shifted sum and sum of squares, one collective per norm on a mesh) was measured on the same
step and moved more bytes, not fewer: XLA already fuses the first pass into the convolution that
produces the input.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

_F32 = jnp.float32


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics and state.

  Unlike `nnx.BatchNorm` it updates the running variance with the unbiased batch variance and counts
  `num_batches_tracked`, as torch.nn.BatchNorm2d does, so that a converted model trains on exactly as
  in PyTorch and a round trip to a state dict reproduces every tensor. `momentum` uses the Flax
  convention (0.9 here = PyTorch's 0.1). Statistics are computed in float32. Under `jax.jit` with a
  batch-sharded input the statistics are over the global batch (synchronised BatchNorm).
  """

  def __init__(self, num_features, *, momentum=0.9, epsilon=1e-5, dtype=jnp.float32):
    self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
    self.use_running_average = False
    self.scale = nnx.Param(jnp.ones((num_features,), _F32))
    self.bias = nnx.Param(jnp.zeros((num_features,), _F32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), _F32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), _F32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    scale, bias = self.scale.get_value(), self.bias.get_value()
    if self.use_running_average:
      mean, var = self.mean.get_value(), self.var.get_value()
      y = (x.astype(_F32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
      return y.astype(self.dtype)
    y, mean, var = batch_norm(x, scale, bias, self.epsilon, self.dtype)
    self.track(mean, var, math.prod(x.shape[:-1]))
    return y

  def track(self, mean, var, count: int):
    """Moves the running statistics towards a training batch's `mean` and biased `var` over
    `count` values per channel (no gradient flows into them), as torch does."""
    unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
    m = self.momentum
    self.mean.set_value(m * self.mean.get_value() + (1 - m) * jax.lax.stop_gradient(mean))
    self.var.set_value(m * self.var.get_value() + (1 - m) * unbiased)
    self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)


def _batch_axes(x):
  return tuple(range(x.ndim - 1))


def _narrow_until_used(grad):
  """A bfloat16 gradient, kept as it is until each of its uses widens it. It has three (two
  sums and the input's gradient): XLA:TPU would otherwise write it once widened to float32, twice
  the bytes, for all three to read (the CvT-13 train step on v5e moved 3.8 GB more per chip,
  benchmarks/RESULTS.md). Float32 gradients (the CPU's) pass untouched."""
  return grad if grad.dtype == _F32 else jax.lax.optimization_barrier(grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, epsilon: float, dtype):
  """Training-mode BatchNorm over all axes but the last: (y as `dtype`, the batch mean, the biased
  batch variance), statistics in float32 (torch's two passes). The gradient, through all three
  outputs, is the closed form; the backward pass keeps only `x`."""
  xf = x.astype(_F32)
  mean = jnp.mean(xf, _batch_axes(x))
  var = jnp.mean(jnp.square(xf - mean), _batch_axes(x))
  y = (xf - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return y.astype(dtype), mean, var


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
  return batch_norm(x, scale, bias, epsilon, dtype), (x, scale)


def _batch_norm_backward(epsilon, dtype, residuals, grads):
  x, scale = residuals
  grad_y, grad_mean, grad_var = grads
  grad_y = _narrow_until_used(grad_y).astype(_F32)
  grad_mean, grad_var = grad_mean.astype(_F32), grad_var.astype(_F32)
  axes, count = _batch_axes(x), math.prod(x.shape[:-1])
  xf = x.astype(_F32)
  mean = jnp.mean(xf, axes)
  centred = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axes) + epsilon)
  grad_bias = jnp.sum(grad_y, axes)
  grad_scale = jnp.sum(grad_y * centred, axes) * rstd
  grad_x = ((grad_y - grad_bias / count - centred * (rstd * grad_scale / count)) * (rstd * scale)
            + grad_mean / count + centred * (2.0 * grad_var / count))
  return grad_x.astype(x.dtype), grad_scale, grad_bias


batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)


def normalise_rows(xf, epsilon: float):
  """Each row of float32 `xf` (its last axis) centred and scaled to unit variance, torch's two-pass
  variance: (normalised rows, 1/std per row). LayerNorm's statistics, also in TPU kernels."""
  centred = xf - jnp.mean(xf, -1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + epsilon)
  return centred * rstd, rstd


def normalise_rows_grad(normalised, rstd, grad_normalised):
  """The input's gradient of `normalise_rows`, from its outputs and theirs."""
  return rstd * (grad_normalised - jnp.mean(grad_normalised, -1, keepdims=True)
                 - normalised * jnp.mean(grad_normalised * normalised, -1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype):
  """LayerNorm of `x` over its last axis, statistics in float32 (torch's two-pass variance), the
  result as `dtype`. The backward pass keeps only `x`."""
  normalised, _ = normalise_rows(x.astype(_F32), epsilon)
  return (normalised * scale + bias).astype(dtype)


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
  return layer_norm(x, scale, bias, epsilon, dtype), (x, scale)


def _layer_norm_backward(epsilon, dtype, residuals, grad_y):
  x, scale = residuals
  normalised, rstd = normalise_rows(x.astype(_F32), epsilon)
  grad_y = grad_y.astype(_F32)
  rows = tuple(range(x.ndim - 1))
  grad_scale, grad_bias = jnp.sum(grad_y * normalised, rows), jnp.sum(grad_y, rows)
  grad_x = normalise_rows_grad(normalised, rstd, grad_y * scale)
  return grad_x.astype(x.dtype), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis (`layer_norm`), with `nnx.LayerNorm`'s parameter names
  (`scale`, `bias`), so checkpoints and conversion tables are the same."""

  def __init__(self, num_features, *, epsilon=1e-5, dtype=jnp.float32):
    self.epsilon, self.dtype = epsilon, dtype
    self.scale = nnx.Param(jnp.ones((num_features,), _F32))
    self.bias = nnx.Param(jnp.zeros((num_features,), _F32))

  def __call__(self, x):
    return layer_norm(x, self.scale.get_value(), self.bias.get_value(), self.epsilon, self.dtype)
