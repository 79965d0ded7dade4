"""The three depthwise convolutions of a block's projections (q at stride 1, k and v at stride 2)
as Pallas (Mosaic) kernels for TPU that read their input once.

XLA:TPU computes each convolution on its own and, by its own estimate, reads a 3x3 depthwise
convolution's input several times over: for CvT-13's three projections at 256 images per chip it
counts 3.4x the bytes of the input and outputs in the forward pass and 4.3-5.9x in the backward
pass (benchmarks/RESULTS.md). Here the forward kernel reads a block of the map once into a
zero-bordered VMEM scratch and writes the three outputs; the backward kernel reads it and the
three output gradients once and writes the input gradient, while the weight gradients accumulate
in VMEM over the images.

The kernels take the map as (h, w, images, channels): positions major, the channels in the lanes.
That is the layout XLA:TPU gives the tokens of the q/k/v linear layers after the convolutions, so
the transposes around the kernels are bitcasts and the BatchNorm between needs no layout change.
(Two other layouts were built and measured on the step: row-major images, and the images in the
lanes, XLA's layout for a depthwise convolution. Both added more layout copies than the kernels
saved.) Every shift of a 3x3 window is along a leading axis, which costs nothing; stride 2 takes
every other row and column by splitting them into pairs. In the backward pass the stride-2
gradients are spread back to full resolution (zeros between), after which all three convolutions
are the same stride-1 sums: the input gradient correlates each gradient with its flipped kernel,
and each weight's gradient is the sum over the map of the shifted input times the gradient. A
block is 16 images by 128 channels (or all of either where they do not divide). Everything runs in
float32; the weights arrive rounded to the compute dtype, as XLA's convolution uses them, so the
outputs differ from XLA's only in summation order.

In training, `depthwise_convs_batch_norm` also takes the BatchNorm after each convolution into
the kernels: a first forward kernel writes only each block's statistics (its mean and sum of
squared deviations, merged in float32 by Chan's formula), a second the normalised outputs; a
first backward kernel sums the BatchNorms' output gradients (and their products with the
normalised outputs) over the batch, a second applies the BatchNorms' backward pass in VMEM before
the convolutions'. Each kernel recomputes the convolutions from the map (9 multiply-adds per
output), so no unnormalised output and no BatchNorm pass reaches HBM.

Maps whose block does not fit VMEM whole (at 224 px, CvT's first two stages) run the same four
kernels in blocks of rows with a halo (`depthwise_conv_rows`), where their sides are even.

Supported: kernel 3, padding 1, strides 1 or 2 (every CvT variant's `dw_bn` projections), maps
that fit VMEM whole or in blocks of rows (`fits`); others take XLA's convolutions.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models import layers
from cvt_flax.models.tpu import depthwise_conv_rows
from cvt_flax.models.tpu.blocks import F32, VMEM_BUDGET, call, nbytes

KERNEL, PADDING, STRIDES = 3, 1, (1, 2)
TAPS = KERNEL * KERNEL
LANES = 128
# Float32 arrays of a block's padded size that Mosaic holds in VMEM at once in the backward kernel:
# 6.4 for blocks of 8 x 128 at CvT-13's stage 2 (23.7 MB, over the 16 MiB limit). With blocks of
# 16 images, CvT-13's last stage (14 x 14) plans exactly VMEM_BUDGET.
_LIVE_BLOCKS = 7
_IMAGES = 16
_SEMANTICS = ('parallel', 'arbitrary')  # channel blocks; images (the weight gradients add up)


def supported(kernel_size: int, strides, paddings) -> bool:
  return (kernel_size == KERNEL and all(p == PADDING for p in paddings)
          and all(s in STRIDES for s in strides))


def out_size(size: int, stride: int) -> int:
  return layers.conv_output_size(size, KERNEL, stride, PADDING)


def _block(b, c):
  """(images, channels) per block: 16 images and 128 channels (the lanes) where they divide, else
  all of them. 16 rows are a bfloat16 tile's (a float32 tile is 8): TPU7x's XLA lays bfloat16
  maps out in (16, 128) tiles, and Mosaic refuses a block of 8 images of them."""
  return _IMAGES if b % _IMAGES == 0 else b, LANES if c % LANES == 0 else c


def _padded(size):
  """A padded axis: one zero before, at least one after, an even count (stride 2 pairs it)."""
  return 2 * ((size + 3) // 2)


def _fits_whole(b: int, h: int, w: int, c: int) -> bool:
  images, channels = _block(b, c)
  sublanes, lanes = pl.cdiv(images, 8) * 8, pl.cdiv(channels, LANES) * LANES
  return _LIVE_BLOCKS * _padded(h) * _padded(w) * sublanes * lanes * 4 <= VMEM_BUDGET


def row_block(b: int, h: int, w: int, c: int,
              itemsize: int) -> depthwise_conv_rows.RowPlan | None:
  """The rows per block each kernel takes an (h, w) map of `b` images and `c` channels in (of
  `itemsize` bytes): None where it fits VMEM whole (or in no blocks of rows)."""
  if _fits_whole(b, h, w, c):
    return None
  return depthwise_conv_rows.plan(h, w, _block(b, c), itemsize)


def fits(b: int, h: int, w: int, c: int, itemsize: int = 2) -> bool:
  """Whether the kernels take such a map: whole, or in blocks of rows."""
  return _fits_whole(b, h, w, c) or row_block(b, h, w, c, itemsize) is not None


def _to_scratch(pad_ref, image):
  """(h, w, images, channels) `image`, as float32, into the zeroed scratch, one in from the top
  and left."""
  h, w = image.shape[:2]
  pad_ref[...] = jnp.zeros(pad_ref.shape, F32)
  pad_ref[1:h + 1, 1:w + 1] = image.astype(F32)


def _window(padded, a, b, h, w, stride):
  """The (h, w) outputs' inputs at tap (a, b): padded[a + stride * i, b + stride * j]."""
  if stride == 1:
    return padded[a:a + h, b:b + w]
  rows, cols = padded.shape[:2]
  pairs = padded.reshape(rows // 2, 2, cols // 2, 2, *padded.shape[2:])
  return pairs[a // 2:a // 2 + h, a % 2, b // 2:b // 2 + w, b % 2]


def _spread(grad, h, w):
  """(ho, wo, ...) `grad` at the even rows and columns of (h, w, ...), zeros between."""
  zeros = jnp.zeros_like(grad)
  ho, wo, *rest = grad.shape
  rows = jnp.stack([grad, zeros], axis=1).reshape(2 * ho, wo, *rest)[:h]
  return jnp.stack([rows, jnp.zeros_like(rows)], axis=2).reshape(h, 2 * wo, *rest)[:, :w]


def _conv_outputs(padded, weights, strides, shapes, dtype):
  """The convolutions of a padded block (float32) at output sizes `shapes`, each rounded to
  `dtype` as an output of that dtype is, and held as float32."""
  outs = []
  for conv, (stride, (ho, wo)) in enumerate(zip(strides, shapes)):
    acc = None
    for tap in range(TAPS):
      term = _window(padded, *divmod(tap, KERNEL), ho, wo, stride) * weights[conv, tap]
      acc = term if acc is None else acc + term
    outs.append(acc.astype(dtype).astype(F32))
  return outs


def _forward_kernel(x_ref, w_ref, *refs, strides, normalise=False):
  """The outputs; where `normalise`, the first of `refs` holds each convolution's BatchNorm
  (convs, 3, 1, c): mean, scale / std, bias."""
  bn_ref, refs = (refs[0], refs[1:]) if normalise else (None, refs)
  *out_refs, pad_ref = refs
  _to_scratch(pad_ref, x_ref[...])
  outs = _conv_outputs(pad_ref[...], w_ref[...], strides, [o.shape[:2] for o in out_refs],
                       x_ref.dtype)
  for conv, (out, out_ref) in enumerate(zip(outs, out_refs)):
    if normalise:
      bn = bn_ref[conv]
      out = (out - bn[0]) * bn[1] + bn[2]
    out_ref[...] = out.astype(out_ref.dtype)


def _channel_sum(t):
  """The sum over a block's positions and images: (1, channels)."""
  return t.sum(axis=(0, 1)).sum(axis=0, keepdims=True)


def _statistics_kernel(x_ref, w_ref, stats_ref, pad_ref, *, strides, shapes):
  """Each convolution's block mean and sum of squared deviations from it (convs, 2, 1, c)."""
  _to_scratch(pad_ref, x_ref[...])
  outs = _conv_outputs(pad_ref[...], w_ref[...], strides, shapes, x_ref.dtype)
  for conv, out in enumerate(outs):
    mean = _channel_sum(out) / math.prod(out.shape[:3])
    stats_ref[conv, 0] = mean
    stats_ref[conv, 1] = _channel_sum(jnp.square(out - mean))


def _bn_grads(x_ref, bn_ref, padded, weights, grad_refs, strides):
  """The BatchNorms' output gradients and the convolutions' recomputed outputs (float32); `bn_ref`:
  (convs, 2, 1, c), each convolution's mean and 1/std."""
  grads = [g[...].astype(F32) for g in grad_refs]
  outs = _conv_outputs(padded, weights, strides, [g.shape[:2] for g in grads], x_ref.dtype)
  return grads, [(out - bn_ref[conv, 0]) * bn_ref[conv, 1] for conv, out in enumerate(outs)]


def _bn_sums_kernel(x_ref, w_ref, bn_ref, *refs, strides):
  """Each BatchNorm's gradient sums over the images: (convs, 2, 1, c), sum(dy), sum(dy * xhat)."""
  grad_refs, (sums_ref, pad_ref) = refs[:len(strides)], refs[len(strides):]

  @pl.when(pl.program_id(1) == 0)
  def _():
    sums_ref[...] = jnp.zeros(sums_ref.shape, F32)

  _to_scratch(pad_ref, x_ref[...])
  grads, normalised = _bn_grads(x_ref, bn_ref, pad_ref[...], w_ref[...], grad_refs, strides)
  for conv, (grad, xhat) in enumerate(zip(grads, normalised)):
    sums_ref[conv, 0] += _channel_sum(grad)
    sums_ref[conv, 1] += _channel_sum(grad * xhat)


def _backward_kernel(x_ref, w_ref, *refs, strides, normalise=False):
  """dx and dw; where `normalise`, the first of `refs` holds each BatchNorm's (convs, 5, 1, c):
  mean, 1/std, and the coefficients of its backward pass (`_bn_backward`), and the gradients
  are the BatchNorms' outputs'."""
  bn_ref, refs = (refs[0], refs[1:]) if normalise else (None, refs)
  grad_refs, (dx_ref, dw_ref, x_pad_ref, g_pad_ref) = refs[:len(strides)], refs[len(strides):]
  h, w = x_ref.shape[:2]

  @pl.when(pl.program_id(1) == 0)
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

  _to_scratch(x_pad_ref, x_ref[...])
  padded, weights = x_pad_ref[...], w_ref[...]
  if normalise:  # the convolutions' output gradients, from the BatchNorms'
    grads, normalised = _bn_grads(x_ref, bn_ref, padded, weights, grad_refs, strides)
    grads = [bn_ref[conv, 2] * grad + bn_ref[conv, 3] + bn_ref[conv, 4] * xhat
             for conv, (grad, xhat) in enumerate(zip(grads, normalised))]
  else:
    grads = [g[...].astype(F32) for g in grad_refs]
  dx = None
  for conv, (grad, stride) in enumerate(zip(grads, strides)):
    if stride == 2:  # each output at the full-resolution position its window starts from
      grad = _spread(grad, h, w)
    _to_scratch(g_pad_ref, grad)
    grad_padded = g_pad_ref[...]
    for tap in range(TAPS):
      a, b = divmod(tap, KERNEL)
      dw_ref[conv, tap] += jnp.sum(_window(padded, a, b, h, w, 1) * grad, axis=(0, 1, 2))[None]
      # The input's gradient: the gradient correlated with the flipped kernel.
      term = _window(grad_padded, a, b, h, w, 1) * weights[conv, TAPS - 1 - tap]
      dx = term if dx is None else dx + term
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _map_spec(shape, block):
  """A (h, w, images, channels) map in blocks of (images, channels); the grid runs over channel
  blocks, then image blocks."""
  return pl.BlockSpec((*shape[:2], *block), lambda i, j: (0, 0, j, i))


def _weights_spec(w, block):
  return pl.BlockSpec((*w.shape[:2], 1, block[1]), lambda i, j: (0, 0, 0, i))


def _out_shapes(x, strides):
  """The outputs of (h, w, b, c) `x`."""
  h, w, b, c = x.shape
  return [jax.ShapeDtypeStruct((out_size(h, s), out_size(w, s), b, c), x.dtype) for s in strides]


def _grid(x, block):
  return x.shape[3] // block[1], x.shape[2] // block[0]


def forward_cost(x, w, outs, *rows, written=True) -> pl.CostEstimate:
  """9 multiply-adds per output value; reads the map, the weights and any per-channel `rows`,
  writes the outputs (or, not `written`, only reads them: the statistics kernels, whose last
  row is their small result)."""
  macs = sum(TAPS * math.prod(o.shape) for o in outs)
  moved = nbytes(x, w, *outs, *rows) if written else nbytes(x, w, *rows)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0, bytes_accessed=moved)


def backward_cost(x, w, grads, dx, dw, *rows) -> pl.CostEstimate:
  """Per output, 9 multiply-adds for the input's gradient and 9 for the weights' at each input
  position (stride 2's gradients are spread to full resolution first); with BatchNorm (`rows`),
  9 more to recompute each output."""
  macs = 2 * len(grads) * TAPS * math.prod(x.shape)
  if rows:
    macs += sum(TAPS * math.prod(g.shape) for g in grads)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0,
                         bytes_accessed=nbytes(x, w, *grads, dx, dw, *rows))


def _scratch(x, block):
  """A float32 VMEM buffer for one block of (h, w, b, c) `x`, zero-bordered."""
  return pltpu.VMEM((_padded(x.shape[0]), _padded(x.shape[1]), *block), F32)


def _rows_spec(rows, block):
  """A (convs, rows, 1, c) array of per-channel rows, in channel blocks."""
  return pl.BlockSpec((rows.shape[0], rows.shape[1], 1, block[1]), lambda i, j: (0, 0, 0, i))


def _forward(x, w, strides, interpret, rows, bn=None):
  """The kernel on (h, w, b, c) `x` and (convs, 9, 1, c) `w`; BatchNorms applied where `bn`; in
  blocks of `rows` rows where not None."""
  block = _block(x.shape[2], x.shape[3])
  if rows is not None:
    return depthwise_conv_rows.forward(x, w, strides, rows.forward, block, interpret, bn)
  outs = _out_shapes(x, strides)
  extra = () if bn is None else (bn,)
  kernel = functools.partial(_forward_kernel, strides=strides, normalise=bn is not None)
  return call(kernel, _grid(x, block), ('parallel', 'parallel'),
              [_map_spec(x.shape, block), _weights_spec(w, block),
               *(_rows_spec(a, block) for a in extra)],
              [_map_spec(o.shape, block) for o in outs], [_scratch(x, block)], outs,
              forward_cost(x, w, outs, *extra), interpret, x, w, *extra)


def _statistics(x, w, strides, interpret, rows):
  """Per image block (and block of rows), each convolution's mean and sum of squared deviations:
  (blocks, convs, 2, 1, c) float32."""
  block = _block(x.shape[2], x.shape[3])
  if rows is not None:
    return depthwise_conv_rows.statistics(x, w, strides, rows.statistics, block, interpret)
  grid = _grid(x, block)
  stats = jax.ShapeDtypeStruct((grid[1], len(strides), 2, 1, x.shape[3]), F32)
  spec = pl.BlockSpec((None, len(strides), 2, 1, block[1]), lambda i, j: (j, 0, 0, 0, i))
  outs = _out_shapes(x, strides)
  kernel = functools.partial(_statistics_kernel, strides=strides,
                             shapes=[o.shape[:2] for o in outs])
  return call(kernel, grid, ('parallel', 'parallel'),
              [_map_spec(x.shape, block), _weights_spec(w, block)], spec, [_scratch(x, block)],
              stats, forward_cost(x, w, outs, stats, written=False), interpret, x, w)


def _bn_sums(x, w, grads, bn, strides, interpret, rows):
  block = _block(x.shape[2], x.shape[3])
  if rows is not None:
    return depthwise_conv_rows.bn_sums(x, w, grads, bn, strides, rows.bn_sums, block, interpret)
  sums = jax.ShapeDtypeStruct((len(strides), 2, 1, x.shape[3]), F32)
  kernel = functools.partial(_bn_sums_kernel, strides=strides)
  in_specs = [_map_spec(x.shape, block), _weights_spec(w, block), _rows_spec(bn, block),
              *(_map_spec(g.shape, block) for g in grads)]
  return call(kernel, _grid(x, block), _SEMANTICS, in_specs, _rows_spec(sums, block),
              [_scratch(x, block)], sums,
              forward_cost(x, w, grads, bn, *grads, sums, written=False), interpret,
              x, w, bn, *grads)


def _backward(x, w, grads, strides, interpret, rows, bn=None):
  block = _block(x.shape[2], x.shape[3])
  if rows is not None:
    return depthwise_conv_rows.backward(x, w, grads, strides, rows.backward, block, interpret,
                                        bn)
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, F32))
  extra = () if bn is None else (bn,)
  kernel = functools.partial(_backward_kernel, strides=strides, normalise=bn is not None)
  in_specs = [_map_spec(x.shape, block), _weights_spec(w, block),
              *(_rows_spec(a, block) for a in extra), *(_map_spec(g.shape, block) for g in grads)]
  return call(kernel, _grid(x, block), _SEMANTICS, in_specs,
              [_map_spec(x.shape, block), _weights_spec(w, block)], [_scratch(x, block)] * 2, outs,
              backward_cost(x, w, grads, *outs, *extra), interpret, x, w, *extra, *grads)


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
    return depthwise_conv_rows.RowPlan(*[rows] * len(depthwise_conv_rows.KERNELS))
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
