"""The depthwise convolutions' kernels (`depthwise_conv`) on maps that fit VMEM whole: a block is
the whole (h, w) map of 16 images by 128 channels (or all of either where they do not divide).

The forward kernel reads a block of the map once into a zero-bordered VMEM scratch and writes the
three outputs; the backward kernel reads it and the three output gradients once and writes the
input gradient, while the weight gradients accumulate in VMEM over the images. Every shift of a
3x3 window is along a leading axis, which costs nothing; stride 2 takes every other row and column
by splitting them into pairs. In the backward pass the stride-2 gradients are spread back to full
resolution (zeros between), after which all three convolutions are the same stride-1 sums: the
input gradient correlates each gradient with its flipped kernel, and each weight's gradient is the
sum over the map of the shifted input times the gradient.

With the BatchNorms (`depthwise_convs_batch_norm`): `statistics` writes each block's mean and sum
of squared deviations, `forward` the normalised outputs, `bn_sums` the BatchNorms' gradient sums
over the images, `backward` dx and dw with the BatchNorms' backward pass applied in VMEM first.
Each recomputes the convolutions from the map (9 multiply-adds per output).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models import layers
from cvt_flax.models.tpu.blocks import F32, VMEM_BUDGET, call, nbytes

KERNEL, PADDING = 3, 1
TAPS = KERNEL * KERNEL
LANES = 128
# Float32 arrays of a block's padded size that Mosaic holds in VMEM at once in the backward kernel:
# 6.4 for blocks of 8 x 128 at CvT-13's stage 2 (23.7 MB, over the 16 MiB limit). With blocks of
# 16 images, CvT-13's last stage (14 x 14) plans exactly VMEM_BUDGET.
_LIVE_BLOCKS = 7
_IMAGES = 16
_SEMANTICS = ('parallel', 'arbitrary')  # channel blocks; images (the weight gradients add up)


def out_size(size: int, stride: int) -> int:
  return layers.conv_output_size(size, KERNEL, stride, PADDING)


def block_of(b, c):
  """(images, channels) per block: 16 images and 128 channels (the lanes) where they divide, else
  all of them. 16 rows are a bfloat16 tile's (a float32 tile is 8): TPU7x's XLA lays bfloat16
  maps out in (16, 128) tiles, and Mosaic refuses a block of 8 images of them."""
  return _IMAGES if b % _IMAGES == 0 else b, LANES if c % LANES == 0 else c


def _padded(size):
  """A padded axis: one zero before, at least one after, an even count (stride 2 pairs it)."""
  return 2 * ((size + 3) // 2)


def fits(b: int, h: int, w: int, c: int) -> bool:
  """Whether a block of the whole map fits VMEM."""
  images, channels = block_of(b, c)
  sublanes, lanes = pl.cdiv(images, 8) * 8, pl.cdiv(channels, LANES) * LANES
  return _LIVE_BLOCKS * _padded(h) * _padded(w) * sublanes * lanes * 4 <= VMEM_BUDGET


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


def forward(x, w, strides, interpret, bn=None):
  """The kernel on (h, w, b, c) `x` and (convs, 9, 1, c) `w`; BatchNorms applied where `bn`."""
  block = block_of(x.shape[2], x.shape[3])
  outs = _out_shapes(x, strides)
  extra = () if bn is None else (bn,)
  kernel = functools.partial(_forward_kernel, strides=strides, normalise=bn is not None)
  return call(kernel, _grid(x, block), ('parallel', 'parallel'),
              [_map_spec(x.shape, block), _weights_spec(w, block),
               *(_rows_spec(a, block) for a in extra)],
              [_map_spec(o.shape, block) for o in outs], [_scratch(x, block)], outs,
              forward_cost(x, w, outs, *extra), interpret, x, w, *extra)


def statistics(x, w, strides, interpret):
  """Per image block, each convolution's mean and sum of squared deviations: (blocks, convs, 2,
  1, c) float32."""
  block = block_of(x.shape[2], x.shape[3])
  grid = _grid(x, block)
  stats = jax.ShapeDtypeStruct((grid[1], len(strides), 2, 1, x.shape[3]), F32)
  spec = pl.BlockSpec((None, len(strides), 2, 1, block[1]), lambda i, j: (j, 0, 0, 0, i))
  outs = _out_shapes(x, strides)
  kernel = functools.partial(_statistics_kernel, strides=strides,
                             shapes=[o.shape[:2] for o in outs])
  return call(kernel, grid, ('parallel', 'parallel'),
              [_map_spec(x.shape, block), _weights_spec(w, block)], spec, [_scratch(x, block)],
              stats, forward_cost(x, w, outs, stats, written=False), interpret, x, w)


def bn_sums(x, w, grads, bn, strides, interpret):
  block = block_of(x.shape[2], x.shape[3])
  sums = jax.ShapeDtypeStruct((len(strides), 2, 1, x.shape[3]), F32)
  kernel = functools.partial(_bn_sums_kernel, strides=strides)
  in_specs = [_map_spec(x.shape, block), _weights_spec(w, block), _rows_spec(bn, block),
              *(_map_spec(g.shape, block) for g in grads)]
  return call(kernel, _grid(x, block), _SEMANTICS, in_specs, _rows_spec(sums, block),
              [_scratch(x, block)], sums,
              forward_cost(x, w, grads, bn, *grads, sums, written=False), interpret,
              x, w, bn, *grads)


def backward(x, w, grads, strides, interpret, bn=None):
  block = block_of(x.shape[2], x.shape[3])
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, F32))
  extra = () if bn is None else (bn,)
  kernel = functools.partial(_backward_kernel, strides=strides, normalise=bn is not None)
  in_specs = [_map_spec(x.shape, block), _weights_spec(w, block),
              *(_rows_spec(a, block) for a in extra), *(_map_spec(g.shape, block) for g in grads)]
  return call(kernel, _grid(x, block), _SEMANTICS, in_specs,
              [_map_spec(x.shape, block), _weights_spec(w, block)], [_scratch(x, block)] * 2, outs,
              backward_cost(x, w, grads, *outs, *extra), interpret, x, w, *extra, *grads)
