"""The three depthwise convolutions of a block's projections (q at stride 1, k and v at stride 2)
as Pallas (Mosaic) kernels for TPU that read their input once, with their training-mode
BatchNorms inside: the op's custom VJPs, and which kernels take a map.

XLA:TPU computes each convolution on its own and, by its own estimate, reads a 3x3 depthwise
convolution's input several times over: for CvT-13's three projections at 256 images per chip it
counts 3.4x the bytes of the input and outputs in the forward pass and 4.3-5.9x in the backward
pass (benchmarks/RESULTS.md). The kernels read a block of the map once and compute the three
convolutions from it: on the whole map where a block of it fits VMEM (`depthwise_conv_whole`, at
224 px CvT's last stage), else in blocks of rows with a halo (`depthwise_conv_rows`, at 224 px
the first two stages).

The kernels take the map as (h, w, images, channels): positions major, the channels in the lanes.
That is the layout XLA:TPU gives the tokens of the q/k/v linear layers after the convolutions, so
the transposes around the kernels are bitcasts and the BatchNorm between needs no layout change.
(Two other layouts were built and measured on the step: row-major images, and the images in the
lanes, XLA's layout for a depthwise convolution. Both added more layout copies than the kernels
saved.) Everything runs in float32; the weights arrive rounded to the compute dtype, as XLA's
convolution uses them, so the outputs differ from XLA's only in summation order.

In training, `depthwise_convs_batch_norm` also takes the BatchNorm after each convolution into
the kernels: a first forward kernel writes only each block's statistics (its mean and sum of
squared deviations, merged in float32 by Chan's formula), a second the normalised outputs; a
first backward kernel sums the BatchNorms' output gradients (and their products with the
normalised outputs) over the batch, a second applies the BatchNorms' backward pass in VMEM before
the convolutions'. Each kernel recomputes the convolutions from the map (9 multiply-adds per
output), so no unnormalised output and no BatchNorm pass reaches HBM.

Supported: kernel 3, padding 1, strides 1 or 2 (every CvT variant's `dw_bn` projections), maps
that fit VMEM whole or in blocks of rows (`fits`); others take XLA's convolutions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cvt_flax.models.tpu import depthwise_conv_rows as rows_kernels
from cvt_flax.models.tpu import depthwise_conv_whole as whole_kernels
from cvt_flax.models.tpu.blocks import F32

KERNEL, PADDING, STRIDES = whole_kernels.KERNEL, whole_kernels.PADDING, (1, 2)
out_size = whole_kernels.out_size


def supported(kernel_size: int, strides, paddings) -> bool:
  return (kernel_size == KERNEL and all(p == PADDING for p in paddings)
          and all(s in STRIDES for s in strides))


def row_block(b: int, h: int, w: int, c: int, itemsize: int) -> rows_kernels.RowPlan | None:
  """The rows per block each kernel takes an (h, w) map of `b` images and `c` channels in (of
  `itemsize` bytes): None where it fits VMEM whole (or in no blocks of rows)."""
  if whole_kernels.fits(b, h, w, c):
    return None
  return rows_kernels.plan(h, w, whole_kernels.block_of(b, c), itemsize)


def fits(b: int, h: int, w: int, c: int, itemsize: int = 2) -> bool:
  """Whether the kernels take such a map: whole, or in blocks of rows."""
  return whole_kernels.fits(b, h, w, c) or rows_kernels.plan(
      h, w, whole_kernels.block_of(b, c), itemsize) is not None


# The four kernels on (h, w, b, c) `x` and (convs, 9, 1, c) `w`: whole maps where `rows` is None,
# else in blocks of `rows` (a `RowPlan`) rows.

def _forward(x, w, strides, interpret, rows, bn=None):
  if rows is None:
    return whole_kernels.forward(x, w, strides, interpret, bn)
  block = whole_kernels.block_of(x.shape[2], x.shape[3])
  return rows_kernels.forward(x, w, strides, rows.forward, block, interpret, bn)


def _statistics(x, w, strides, interpret, rows):
  if rows is None:
    return whole_kernels.statistics(x, w, strides, interpret)
  block = whole_kernels.block_of(x.shape[2], x.shape[3])
  return rows_kernels.statistics(x, w, strides, rows.statistics, block, interpret)


def _bn_sums(x, w, grads, bn, strides, interpret, rows):
  if rows is None:
    return whole_kernels.bn_sums(x, w, grads, bn, strides, interpret)
  block = whole_kernels.block_of(x.shape[2], x.shape[3])
  return rows_kernels.bn_sums(x, w, grads, bn, strides, rows.bn_sums, block, interpret)


def _backward(x, w, grads, strides, interpret, rows, bn=None):
  if rows is None:
    return whole_kernels.backward(x, w, grads, strides, interpret, bn)
  block = whole_kernels.block_of(x.shape[2], x.shape[3])
  return rows_kernels.backward(x, w, grads, strides, rows.backward, block, interpret, bn)


def _to_kernel(x):
  """NHWC -> (h, w, b, c): positions major, then images, channels in the lanes, the layout
  XLA:TPU gives the tokens of the linear layers that follow (so the transpose is a bitcast)."""
  return x.transpose(1, 2, 0, 3)


def _from_kernel(x):
  return x.transpose(2, 0, 1, 3)


def _rows(x, rows):
  """The rows per block of each kernel for NHWC `x`: `rows` for all where given (the tests'
  choice), else the plan's (None: the whole map)."""
  if rows is not None:
    return rows_kernels.RowPlan(*[rows] * len(rows_kernels.KERNELS))
  b, h, w, c = x.shape
  return row_block(b, h, w, c, jnp.dtype(x.dtype).itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_convs(x, w, strides, interpret=False, rows=None):
  """Depthwise 3x3 convolutions of NHWC `x` with zero padding 1, one per stride in `strides`
  (each 1 or 2): a list of outputs in x's dtype. `w`: (len(strides), 9, C) float32, the kernels'
  (3, 3) taps in row-major order. `interpret`: Pallas's TPU interpreter instead of Mosaic.
  `rows`: the rows per block (even, dividing the height) instead of `row_block`'s choice."""
  return _convs_forward(x, w, strides, interpret, rows)[0]


def _convs_forward(x, w, strides, interpret, rows):
  outs = _forward(_to_kernel(x), w[:, :, None], strides, interpret, _rows(x, rows))
  return [_from_kernel(o) for o in outs], (x, w)


def _convs_backward(strides, interpret, rows, residuals, grads):
  x, w = residuals
  dx, dw = _backward(_to_kernel(x), w[:, :, None], [_to_kernel(g) for g in grads], strides,
                     interpret, _rows(x, rows))
  return _from_kernel(dx), dw[:, :, 0]


depthwise_convs.defvjp(_convs_forward, _convs_backward)


# ----------------------------------------------------------------------------------------------------
# The convolutions with their training-mode BatchNorms.

def _shards(axis_name) -> int:
  """How many shards of the batch `axis_name` names (1 off a mesh)."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _counts(strides, fmap_shape, axis_name):
  """Each convolution's outputs per channel over the batch (all of `axis_name`'s shards): (convs,
  1)."""
  b, h, w, _ = fmap_shape
  return jnp.asarray([_shards(axis_name) * b * out_size(h, s) * out_size(w, s) for s in strides],
                     F32)[:, None]


def _merge_statistics(stats, count, axis_name):
  """The batch mean and biased variance (convs, c) from the blocks' means and sums of squared
  deviations, over all `axis_name`'s shards (Chan's parallel merge: equal counts per block, no
  cancellation)."""
  means, squares = stats[:, :, 0, 0], stats[:, :, 1, 0]
  blocks = means.shape[0] * _shards(axis_name)
  mean = _psum(jnp.sum(means, axis=0), axis_name) / blocks
  spread, squares = _psum(jnp.stack([jnp.sum(jnp.square(means - mean), axis=0),
                                     jnp.sum(squares, axis=0)]), axis_name)
  return mean, (squares + count / blocks * spread) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def depthwise_convs_batch_norm(x, w, scale, bias, strides, epsilon, axis_name=None,
                               interpret=False, rows=None):
  """`depthwise_convs` followed by a training-mode BatchNorm of each output (the statistics over
  all the batch's images and positions): (outputs in x's dtype, batch means (convs, c), biased
  batch variances (convs, c)). `scale`, `bias`: (convs, c) float32. Each convolution's output is
  rounded to x's dtype before it is normalised, as a separate BatchNorm would receive it.
  `axis_name`: the named axes the batch is split over (`sharded.batch_axes`), whose shards' images
  the statistics take in, as `flax.nnx.BatchNorm`'s.

  Two kernels forward (the statistics of each image block, merged in float32; then the
  normalised outputs) and two backward (the BatchNorms' gradient sums; then dx and dw with the
  BatchNorms' backward pass applied in VMEM). Each recomputes the convolutions from the map, so no
  unnormalised output reaches HBM."""
  return _bn_forward(x, w, scale, bias, strides, epsilon, axis_name, interpret, rows)[0]


def _bn_forward(x, w, scale, bias, strides, epsilon, axis_name, interpret, rows):
  w4, fmap, rows = w[:, :, None], _to_kernel(x), _rows(x, rows)
  stats = _statistics(fmap, w4, strides, interpret, rows)
  mean, var = _merge_statistics(stats, _counts(strides, x.shape, axis_name), axis_name)
  rstd = jax.lax.rsqrt(var + epsilon)
  bn = jnp.stack([mean, scale * rstd, bias], axis=1)[:, :, None]
  outs = [_from_kernel(o) for o in _forward(fmap, w4, strides, interpret, rows, bn)]
  return (outs, mean, var), (x, w, scale, mean, rstd)


def _bn_backward(strides, epsilon, axis_name, interpret, rows, residuals, cotangents):
  x, w, scale, mean, rstd = residuals
  rows = _rows(x, rows)
  grads, d_mean, d_var = cotangents
  w4, norm = w[:, :, None], jnp.stack([mean, rstd], axis=1)[:, :, None]
  fmap, grads = _to_kernel(x), [_to_kernel(g.astype(x.dtype)) for g in grads]
  local = _bn_sums(fmap, w4, grads, norm, strides, interpret, rows)
  # The statistics summed over the shards forward, so their cotangents (and the sums the
  # normalisation's gradient needs) are summed over them backward.
  total, d_mean, d_var = (_psum(a, axis_name) for a in (local, d_mean, d_var))
  d_bias, d_scale = total[:, 0, 0], total[:, 1, 0]  # sum(dy), sum(dy * xhat)
  count = _counts(strides, x.shape, axis_name)
  k1 = scale * rstd
  coefficients = jnp.stack([mean, rstd, k1, d_mean / count - k1 * d_bias / count,
                            2 * d_var / (count * rstd) - k1 * d_scale / count], axis=1)[:, :, None]
  dx, dw = _backward(fmap, w4, grads, strides, interpret, rows, coefficients)
  # This shard's share of the parameters' gradients (`sharded.on_batch_shards` adds the shares).
  return _from_kernel(dx), dw[:, :, 0], local[:, 1, 0], local[:, 0, 0]


depthwise_convs_batch_norm.defvjp(_bn_forward, _bn_backward)
