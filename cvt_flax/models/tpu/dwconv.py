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
block is 8 images by 128 channels (or all of either where they do not divide). Everything runs in
float32; the weights arrive rounded to the compute dtype, as XLA's convolution uses them, so the
outputs differ from XLA's only in summation order.

Supported: kernel 3, padding 1, strides 1 or 2 (every CvT variant's `dw_bn` projections), maps
whose block fits in VMEM (`fits`): at 224 px, CvT's last stage (14 x 14); larger maps take XLA's
convolutions.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models.tpu.blocks import F32, VMEM_BUDGET, call, nbytes, on_batch_shards

KERNEL, PADDING, STRIDES = 3, 1, (1, 2)
TAPS = KERNEL * KERNEL
LANES = 128
# Float32 arrays of a block's padded size that Mosaic holds in VMEM at once in the backward kernel:
# 6.4 for blocks of 8 x 128 at CvT-13's stage 2 (23.7 MB, over the 16 MiB limit).
_LIVE_BLOCKS = 7
_SEMANTICS = ('parallel', 'arbitrary')  # channel blocks; images (the weight gradients add up)


def supported(kernel_size: int, strides, paddings) -> bool:
  return (kernel_size == KERNEL and all(p == PADDING for p in paddings)
          and all(s in STRIDES for s in strides))


def out_size(size: int, stride: int) -> int:
  return (size + 2 * PADDING - KERNEL) // stride + 1


def _block(b, c):
  """(images, channels) per block: 8 images (a float32 tile's rows) and 128 channels (the lanes)
  where they divide, else all of them."""
  return 8 if b % 8 == 0 else b, LANES if c % LANES == 0 else c


def _padded(size):
  """A padded axis: one zero before, at least one after, an even count (stride 2 pairs it)."""
  return 2 * ((size + 3) // 2)


def fits(b: int, h: int, w: int, c: int) -> bool:
  images, channels = _block(b, c)
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


def _forward_kernel(x_ref, w_ref, *refs, strides):
  *out_refs, pad_ref = refs
  _to_scratch(pad_ref, x_ref[...])
  padded, weights = pad_ref[...], w_ref[...]
  for conv, (out_ref, stride) in enumerate(zip(out_refs, strides)):
    ho, wo = out_ref.shape[:2]
    acc = None
    for tap in range(TAPS):
      term = _window(padded, *divmod(tap, KERNEL), ho, wo, stride) * weights[conv, tap]
      acc = term if acc is None else acc + term
    out_ref[...] = acc.astype(out_ref.dtype)


def _backward_kernel(x_ref, w_ref, *refs, strides):
  grad_refs, (dx_ref, dw_ref, x_pad_ref, g_pad_ref) = refs[:len(strides)], refs[len(strides):]
  h, w = x_ref.shape[:2]

  @pl.when(pl.program_id(1) == 0)
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

  _to_scratch(x_pad_ref, x_ref[...])
  padded, weights = x_pad_ref[...], w_ref[...]
  dx = None
  for conv, (grad_ref, stride) in enumerate(zip(grad_refs, strides)):
    grad = grad_ref[...].astype(F32)
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


def forward_cost(x, w, outs) -> pl.CostEstimate:
  """9 multiply-adds per output value; reads the map and the weights, writes the outputs."""
  macs = sum(TAPS * math.prod(o.shape) for o in outs)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0, bytes_accessed=nbytes(x, w, *outs))


def backward_cost(x, w, grads, dx, dw) -> pl.CostEstimate:
  """Per output, 9 multiply-adds for the input's gradient and 9 for the weights' at each input
  position (stride 2's gradients are spread to full resolution first)."""
  macs = 2 * len(grads) * TAPS * math.prod(x.shape)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0,
                         bytes_accessed=nbytes(x, w, *grads, dx, dw))


def _scratch(x, block):
  """A float32 VMEM buffer for one block of (h, w, b, c) `x`, zero-bordered."""
  return pltpu.VMEM((_padded(x.shape[0]), _padded(x.shape[1]), *block), F32)


def _forward(x, w, strides, interpret):
  """The kernel on (h, w, b, c) `x` and (convs, 9, 1, c) `w`."""
  block = _block(x.shape[2], x.shape[3])
  outs = _out_shapes(x, strides)
  kernel = functools.partial(_forward_kernel, strides=strides)
  return call(kernel, _grid(x, block), ('parallel', 'parallel'),
              [_map_spec(x.shape, block), _weights_spec(w, block)],
              [_map_spec(o.shape, block) for o in outs], [_scratch(x, block)], outs,
              forward_cost(x, w, outs), interpret, x, w)


def _backward(x, w, grads, strides, interpret):
  block = _block(x.shape[2], x.shape[3])
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, F32))
  kernel = functools.partial(_backward_kernel, strides=strides)
  in_specs = [_map_spec(x.shape, block), _weights_spec(w, block),
              *(_map_spec(g.shape, block) for g in grads)]
  return call(kernel, _grid(x, block), _SEMANTICS, in_specs,
              [_map_spec(x.shape, block), _weights_spec(w, block)], [_scratch(x, block)] * 2, outs,
              backward_cost(x, w, grads, *outs), interpret, x, w, *grads)


def _to_kernel(x):
  """NHWC -> (h, w, b, c): positions major, then images, channels in the lanes, the layout
  XLA:TPU gives the tokens of the linear layers that follow (so the transpose is a bitcast)."""
  return x.transpose(1, 2, 0, 3)


def _from_kernel(x):
  return x.transpose(2, 0, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_convs(x, w, strides, mesh=None, interpret=False):
  """Depthwise 3x3 convolutions of NHWC `x` with zero padding 1, one per stride in `strides`
  (each 1 or 2): a list of outputs in x's dtype. `w`: (len(strides), 9, C) float32, the kernels'
  (3, 3) taps in row-major order. `mesh`: the devices the batch is split over (the weight
  gradients are summed). `interpret`: Pallas's TPU interpreter instead of Mosaic."""
  return _convs_forward(x, w, strides, mesh, interpret)[0]


def _convs_forward(x, w, strides, mesh, interpret):
  def forward(x, w):
    return tuple(_from_kernel(o) for o in _forward(_to_kernel(x), w[:, :, None], strides,
                                                     interpret))
  outs = on_batch_shards(mesh, forward, (x, w), split_in=1, split_out=len(strides))
  return list(outs), (x, w)


def _convs_backward(strides, mesh, interpret, residuals, grads):
  x, w = residuals

  def backward(x, *grads_and_w):
    *grads, w = grads_and_w
    dx, dw = _backward(_to_kernel(x), w[:, :, None], [_to_kernel(g) for g in grads], strides,
                       interpret)
    dw = dw[:, :, 0]
    if mesh is not None and mesh.size > 1:
      dw = jax.lax.psum(dw, mesh.axis_names)
    return _from_kernel(dx), dw

  return on_batch_shards(mesh, backward, (x, *grads, w), split_in=1 + len(grads), whole_out=1)


depthwise_convs.defvjp(_convs_forward, _convs_backward)
