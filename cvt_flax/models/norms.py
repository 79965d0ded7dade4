"""The model's normalisation layers, with PyTorch's semantics: BatchNorm (the convolutional
projections') and LayerNorm (everything else).

LayerNorm is a `jax.custom_vjp`: it normalises each token over its channels, so its statistics never
leave the token's row, and its backward pass recomputes them from the saved input in the same
elementwise pass that computes the input's gradient. Autodiff of the textbook formula instead
stores float32 intermediates between several passes; on the CvT-13 TPU step the closed form moves
5.7 GB less per chip (benchmarks/RESULTS.md).

BatchNorm stays the textbook two-pass formula under autodiff. A one-pass form (a shifted sum and sum
of squares, as a `jax.custom_vjp` with the closed-form gradient, one collective per norm on a mesh)
was measured on the same step and moved more bytes, not fewer: XLA already fuses the first pass
into the convolution that produces the input (benchmarks/RESULTS.md).
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
    xf = x.astype(_F32)
    if self.use_running_average:
      mean, var = self.mean.get_value(), self.var.get_value()
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = math.prod(x.shape[:-1])
      unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      m = self.momentum
      self.mean.set_value(m * self.mean.get_value() + (1 - m) * jax.lax.stop_gradient(mean))
      self.var.set_value(m * self.var.get_value() + (1 - m) * unbiased)
      self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)
    scale, bias = self.scale.get_value(), self.bias.get_value()
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype):
  """LayerNorm of `x` over its last axis, statistics in float32 (torch's two-pass variance), the
  result as `dtype`. The backward pass keeps only `x`."""
  xf = x.astype(_F32)
  mean = jnp.mean(xf, -1, keepdims=True)
  centred = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + epsilon)
  return (centred * rstd * scale + bias).astype(dtype)


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
  return layer_norm(x, scale, bias, epsilon, dtype), (x, scale)


def _layer_norm_backward(epsilon, dtype, residuals, grad_y):
  x, scale = residuals
  xf = x.astype(_F32)
  centred = xf - jnp.mean(xf, -1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + epsilon)
  normalised = centred * rstd
  grad_y = grad_y.astype(_F32)
  rows = tuple(range(x.ndim - 1))
  grad_scale, grad_bias = jnp.sum(grad_y * normalised, rows), jnp.sum(grad_y, rows)
  grad_normalised = grad_y * scale
  grad_x = rstd * (grad_normalised - jnp.mean(grad_normalised, -1, keepdims=True)
                   - normalised * jnp.mean(grad_normalised * normalised, -1, keepdims=True))
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
