"""The depthwise convolutions' kernels (`depthwise_conv`) for maps too large for VMEM whole: the
map in blocks of rows, each with its neighbours' rows beside it (a halo), one output row at a time.

A block is `rows` rows of the map by 16 images by 128 channels (or all of either), at full width.
Besides the block, a kernel reads the row above and the row below it (two each where the backward
pass recomputes a BatchNorm's input at its neighbours' rows), clamped to the map and taken as zeros
at its edges. Nothing of a block is held in float32 at once: each output row is the sum of nine
shifted input rows times a weight, and the rows are visited in an order in which a row of the map
dies within a few output rows. What the whole-map kernels do for a map, these do for a block of
rows; `depthwise_conv` calls them, merges their statistics and holds the custom VJPs:

  statistics  each output's mean and sum of squared deviations over the block (rows merged by
              Chan's formula, equal counts)
  forward     the outputs of a block's rows, normalised by a BatchNorm where given
  bn_sums     the BatchNorms' gradient sums over the images, sum(dy) and sum(dy * xhat)
  backward    dx of the block's rows, and dw summed over all blocks; with a BatchNorm, its
              backward pass applied at each output row (the rows of the halo included) first

The halos are the blocks' cost: a block of `rows` rows reads (rows + 2) / rows of the map ((rows +
4) / rows in the BatchNorm's backward kernel), so each kernel takes the most rows that fit its
VMEM (`plan`). The rows are unrolled, and Mosaic's register allocator spills what they hold, so a
kernel's VMEM grows with its rows beyond its pipeline's buffers: `_VMEM_ROWS` has what Mosaic
reported, and the Mosaic compile tests hold the plan on v4's 16 MiB cores.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cvt_flax.models.tpu.blocks import F32, VMEM_BUDGET, call, nbytes

TAPS = 9  # a 3x3 kernel's taps, in row-major order
LANES = 128
KERNELS = ('statistics', 'forward', 'bn_sums', 'backward')
# Each kernel's VMEM in rows of the block's map in its dtype (`_row_bytes`): a fixed part and a
# part per row of the block, through two compiles for v4 at CvT-13's 56 x 56 x 64 map (256 images,
# bfloat16; Mosaic's "Program vmem requirement", benchmarks/RESULTS.md). At 28 x 28 x 192 they are
# within 4% of Mosaic's figures (the statistics kernel: 18% over). The unrolled program's register spills grow with the rows as the
# pipeline's buffers do; the backward kernel holds the most (the map with two halo rows either
# side, three gradients, dx, the weights' gradients).
_VMEM_ROWS = {'statistics': (6.2, 6.6), 'forward': (13.0, 5.1), 'bn_sums': (7.9, 8.4),
              'backward': (19.9, 14.0)}


class RowPlan(NamedTuple):
  """The rows per block of each kernel (the statistics' blocks need only equal counts)."""
  statistics: int
  forward: int
  bn_sums: int
  backward: int


def _row_bytes(w, block, itemsize) -> int:
  """One row of a (h, w, images, channels) block in VMEM (images padded to 16, lanes to 128)."""
  return w * pl.cdiv(block[0], 16) * 16 * pl.cdiv(block[1], LANES) * LANES * itemsize


def vmem_bytes(kernel: str, rows: int, w: int, block, itemsize: int) -> float:
  fixed, per_row = _VMEM_ROWS[kernel]
  return (fixed + per_row * rows) * _row_bytes(w, block, itemsize)


def plan(h: int, w: int, block, itemsize: int) -> RowPlan | None:
  """Each kernel's rows per block for an (h, w) map: the most that fit `VMEM_BUDGET`, even
  (stride 2 pairs rows), dividing h (every block the same count, as the statistics' merge takes
  them), fewer than h; None where a kernel fits no block of 2 or more rows or a side is odd."""
  if h % 2 or w % 2:
    return None
  rows = []
  for kernel in KERNELS:
    fitting = [r for r in range(2, h, 2)
               if h % r == 0 and vmem_bytes(kernel, r, w, block, itemsize) <= VMEM_BUDGET]
    if not fitting:
      return None
    rows.append(max(fitting))
  return RowPlan(*rows)


class _Rows:
  """Rows -halo .. rows + halo - 1 of a block of the map as float32, each zero-padded by a column
  either side; the halo's rows past the map's edge are zeros. Rows are read once, when first
  asked for."""

  def __init__(self, main_ref, top_ref, bottom_ref):
    self.refs, self.cache = (main_ref, top_ref, bottom_ref), {}
    self.rows, self.halo = main_ref.shape[0], top_ref.shape[0]

  def __getitem__(self, r):
    if r not in self.cache:
      main, top, bottom = self.refs
      if r < 0:
        row = _masked(top[self.halo + r], _has_neighbour(below=False))
      elif r >= self.rows:
        row = _masked(bottom[r - self.rows], _has_neighbour(below=True))
      else:
        row = main[r].astype(F32)
      self.cache[r] = _pad_columns(row)
    return self.cache[r]


def _has_neighbour(below: bool):
  """Whether this block has a block of rows below it (or above it)."""
  k = pl.program_id(2)
  return k < pl.num_programs(2) - 1 if below else k > 0


def _masked(row, valid):
  return jnp.where(valid, row.astype(F32), jnp.zeros(row.shape, F32))


def _pad_columns(row):
  zero = jnp.zeros((1, *row.shape[1:]), row.dtype)
  return jnp.concatenate([zero, row, zero], axis=0)


def _taps(padded_row, b, width, stride):
  """The `width` outputs' inputs at column tap b: padded_row[b + stride * j]."""
  if stride == 1:
    return padded_row[b:b + width]
  pairs = padded_row.reshape(padded_row.shape[0] // 2, 2, *padded_row.shape[1:])
  return pairs[b // 2:b // 2 + width, b % 2]


def _output_row(rows, weights, stride, o, dtype):
  """Output row `o` of a convolution (its (9, 1, c) `weights`), rounded to `dtype` as an output
  of that dtype is, held as float32."""
  width = (rows[0].shape[0] - 2) // stride
  acc = None
  for tap in range(TAPS):
    a, b = divmod(tap, 3)
    term = _taps(rows[stride * o + a - 1], b, width, stride) * weights[tap]
    acc = term if acc is None else acc + term
  return acc.astype(dtype).astype(F32)


def _in_row_order(rows, strides):
  """(conv, output row) pairs, each as soon as the block's rows it needs have been used by the
  stride-1 outputs before it: a row of the map is read and dies within a few output rows, so the
  program's live values stay a few rows whatever the block's height."""
  for o in range(rows):
    for conv, stride in enumerate(strides):
      if (o + 1) % stride == 0:
        yield conv, (o + 1) // stride - 1


def _row_sum(t):
  """A row's sum over its positions and images: (1, channels)."""
  return t.sum(axis=0).sum(axis=0, keepdims=True)


def _forward_kernel(x_ref, top_ref, bottom_ref, w_ref, *refs, strides, normalise):
  """The outputs; where `normalise`, the first of `refs` holds each BatchNorm's (convs, 3, 1, c):
  mean, scale / std, bias."""
  bn_ref, out_refs = (refs[0], refs[1:]) if normalise else (None, refs)
  rows, weights = _Rows(x_ref, top_ref, bottom_ref), w_ref[...]
  for conv, o in _in_row_order(x_ref.shape[0], strides):
    out = _output_row(rows, weights[conv], strides[conv], o, x_ref.dtype)
    if normalise:
      out = (out - bn_ref[conv, 0]) * bn_ref[conv, 1] + bn_ref[conv, 2]
    out_refs[conv][o] = out.astype(out_refs[conv].dtype)


def _statistics_kernel(x_ref, top_ref, bottom_ref, w_ref, stats_ref, *, strides):
  """Each convolution's block mean and sum of squared deviations from it (convs, 2, 1, c): each
  row's, merged by Chan's formula (every row has the same count)."""
  rows, weights = _Rows(x_ref, top_ref, bottom_ref), w_ref[...]
  means, squares, count = [[] for _ in strides], [[] for _ in strides], [0] * len(strides)
  for conv, o in _in_row_order(x_ref.shape[0], strides):
    out = _output_row(rows, weights[conv], strides[conv], o, x_ref.dtype)
    count[conv] = math.prod(out.shape[:2])
    means[conv].append(_row_sum(out) / count[conv])
    squares[conv].append(_row_sum(jnp.square(out - means[conv][-1])))
  for conv in range(len(strides)):
    mean = sum(means[conv]) / len(means[conv])
    stats_ref[conv, 0] = mean
    stats_ref[conv, 1] = sum(squares[conv]) + count[conv] * sum(
        jnp.square(m - mean) for m in means[conv])


def _first_step():
  return jnp.logical_and(pl.program_id(1) == 0, pl.program_id(2) == 0)


def _bn_sums_kernel(x_ref, top_ref, bottom_ref, w_ref, bn_ref, *refs, strides):
  """Each BatchNorm's gradient sums over the images: (convs, 2, 1, c), sum(dy), sum(dy * xhat);
  `bn_ref`: (convs, 2, 1, c), each convolution's mean and 1/std."""
  grad_refs, sums_ref = refs[:-1], refs[-1]

  @pl.when(_first_step())
  def _():
    sums_ref[...] = jnp.zeros(sums_ref.shape, F32)

  rows, weights = _Rows(x_ref, top_ref, bottom_ref), w_ref[...]
  sums = [[0.0, 0.0] for _ in strides]
  for conv, o in _in_row_order(x_ref.shape[0], strides):
    grad = grad_refs[conv][o].astype(F32)
    xhat = (_output_row(rows, weights[conv], strides[conv], o, x_ref.dtype)
            - bn_ref[conv, 0]) * bn_ref[conv, 1]
    sums[conv][0] = sums[conv][0] + _row_sum(grad)
    sums[conv][1] = sums[conv][1] + _row_sum(grad * xhat)
  for conv, (grad_sum, product_sum) in enumerate(sums):
    sums_ref[conv, 0] += grad_sum
    sums_ref[conv, 1] += product_sum


class _ConvGrads:
  """A convolution's output gradients at the full-resolution rows -1 .. R of a block of R rows
  (stride 2: each gradient row at the even row its window starts from, its columns at the even
  columns, zeros between), float32, computed when first asked for. `grads`: the (main, top,
  bottom) refs of the gradient (top None at stride 2). With `bn` (5, 1, c: mean, 1/std and the
  coefficients of the BatchNorm's backward pass) that pass is applied first, the convolution's
  output recomputed; rows past the map's edge are zeros."""

  def __init__(self, rows, weights, grads, bn, stride, dtype):
    self.rows, self.weights, self.grads, self.bn = rows, weights, grads, bn
    self.stride, self.dtype, self.cache = stride, dtype, {}

  def _output_grad(self, r):
    main, top, bottom = self.grads
    if r < 0:
      ref, i, valid = top, 0, _has_neighbour(below=False)
    elif r >= main.shape[0]:
      ref, i, valid = bottom, 0, _has_neighbour(below=True)
    else:
      ref, i, valid = main, r, None
    grad = ref[i].astype(F32)
    if self.bn is not None:
      bn = self.bn
      xhat = (_output_row(self.rows, self.weights, self.stride, r, self.dtype) - bn[0]) * bn[1]
      grad = bn[2] * grad + bn[3] + bn[4] * xhat
    return grad if valid is None else _masked(grad, valid)

  def __getitem__(self, p):
    """Full-resolution row p, unpadded and padded a column either side; None where zeros."""
    if p % self.stride:
      return None
    if p not in self.cache:
      grad = self._output_grad(p // self.stride)
      if self.stride == 2:
        grad = _spread_columns(grad)
      self.cache[p] = grad, _pad_columns(grad)
    return self.cache[p]


def _spread_columns(row):
  """(w/2, ...) `row` at the even columns of (w, ...), zeros between."""
  return jnp.stack([row, jnp.zeros_like(row)], axis=1).reshape(2 * row.shape[0], *row.shape[1:])


def _backward_kernel(x_ref, top_ref, bottom_ref, w_ref, *refs, strides, normalise):
  """dx and dw; where `normalise`, the first of `refs` holds each BatchNorm's (convs, 5, 1, c)
  (`_ConvGrads`), and the gradients are the BatchNorms' outputs'. Then per convolution the
  gradient's main, (stride 1) top and bottom blocks; dx; dw. Row by row of dx, so that a row of
  the map or of a gradient dies within three rows of its first use."""
  bn_ref, refs = (refs[0], refs[1:]) if normalise else (None, refs)
  dx_ref, dw_ref = refs[-2:]

  @pl.when(_first_step())
  def _():
    dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

  rows, weights = _Rows(x_ref, top_ref, bottom_ref), w_ref[...]
  convs, i = [], 0
  for conv, stride in enumerate(strides):
    main, *halo = refs[i:i + (3 if stride == 1 else 2)]
    i += 1 + len(halo)
    grads = (main, *halo) if stride == 1 else (main, None, halo[0])
    convs.append(_ConvGrads(rows, weights[conv], grads, None if bn_ref is None else bn_ref[conv],
                            stride, x_ref.dtype))
  dw = [[0.0] * TAPS for _ in strides]
  for p in range(x_ref.shape[0]):
    dx = None
    for conv, grads in enumerate(convs):
      for tap in range(TAPS):
        a, b = divmod(tap, 3)
        if grads[p] is not None:  # each weight: the shifted input times the gradient
          grad = grads[p][0]
          dw[conv][tap] = dw[conv][tap] + (_taps(rows[p + a - 1], b, grad.shape[0], 1)
                                           * grad).sum(axis=0)
        if grads[p + a - 1] is not None:  # the input: the gradient times the flipped kernel
          term = (_taps(grads[p + a - 1][1], b, x_ref.shape[1], 1)
                  * weights[conv, TAPS - 1 - tap])
          dx = term if dx is None else dx + term
    dx_ref[p] = dx.astype(dx_ref.dtype)
  for conv, taps in enumerate(dw):
    for tap, total in enumerate(taps):
      dw_ref[conv, tap] += total.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------------------
# The calls: a grid of channel blocks, image blocks, row blocks.

_PARALLEL = ('parallel', 'parallel', 'parallel')
_SUMMED = ('parallel', 'arbitrary', 'arbitrary')  # the image and row blocks' sums add up


def _grid(x, block, rows):
  return x.shape[3] // block[1], x.shape[2] // block[0], x.shape[0] // rows


def _rows_spec(shape, rows, block):
  """Blocks of `rows` rows of a (h, w, b, c) map, at full width."""
  return pl.BlockSpec((rows, shape[1], *block), lambda i, j, k: (k, 0, j, i))


def _halo_spec(shape, rows, halo, block, below):
  """The `halo` rows below (or above) each block of `rows` rows of a (h, w, b, c) map, clamped to
  the map (the kernels mask them there)."""
  last, step = shape[0] // halo - 1, rows // halo

  def index(i, j, k):
    start = (k + 1) * step if below else k * step - 1
    return jnp.clip(start, 0, last), 0, j, i
  return pl.BlockSpec((halo, shape[1], *block), index)


def _x_specs(x, rows, halo, block):
  return [_rows_spec(x.shape, rows, block), _halo_spec(x.shape, rows, halo, block, False),
          _halo_spec(x.shape, rows, halo, block, True)]


def _channels_spec(a, block):
  """A (convs, n, 1, c) array of per-channel rows, in channel blocks."""
  return pl.BlockSpec((*a.shape[:2], 1, block[1]), lambda i, j, k: (0, 0, 0, i))


def _outputs(x, strides):
  h, w, b, c = x.shape
  return [jax.ShapeDtypeStruct((h // s, w // s, b, c), x.dtype) for s in strides]


def _read(x, rows, halo) -> float:
  """The bytes of `x` that blocks of `rows` rows with `halo` rows either side read."""
  return nbytes(x) * (rows + 2 * halo) / rows


def _forward_cost(x, outs, rows, *small, written=True):
  """9 multiply-adds per output; reads the map with its halos and the per-channel `small` arrays,
  writes the outputs (not `written`: the statistics, the last of `small`)."""
  macs = sum(TAPS * math.prod(o.shape) for o in outs)
  moved = _read(x, rows, 1) + nbytes(*small) + (nbytes(*outs) if written else 0)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0, bytes_accessed=int(moved))


def forward(x, w, strides, rows, block, interpret, bn=None):
  """The outputs of (h, w, b, c) `x` and (convs, 9, 1, c) `w`; BatchNorms applied where `bn`."""
  outs, extra = _outputs(x, strides), () if bn is None else (bn,)
  kernel = functools.partial(_forward_kernel, strides=strides, normalise=bn is not None)
  return call(kernel, _grid(x, block, rows), _PARALLEL,
              [*_x_specs(x, rows, 1, block), _channels_spec(w, block),
               *(_channels_spec(a, block) for a in extra)],
              [_rows_spec(o.shape, rows // s, block) for o, s in zip(outs, strides)], [], outs,
              _forward_cost(x, outs, rows, w, *extra), interpret, x, x, x, w, *extra)


def statistics(x, w, strides, rows, block, interpret):
  """Per block of images and rows, each convolution's mean and sum of squared deviations:
  (blocks, convs, 2, 1, c) float32."""
  grid = _grid(x, block, rows)
  stats = jax.ShapeDtypeStruct((grid[1] * grid[2], len(strides), 2, 1, x.shape[3]), F32)
  spec = pl.BlockSpec((None, len(strides), 2, 1, block[1]),
                      lambda i, j, k: (j * grid[2] + k, 0, 0, 0, i))
  kernel = functools.partial(_statistics_kernel, strides=strides)
  return call(kernel, grid, _PARALLEL, [*_x_specs(x, rows, 1, block), _channels_spec(w, block)],
              spec, [], stats, _forward_cost(x, _outputs(x, strides), rows, w, stats,
                                             written=False), interpret, x, x, x, w)


def bn_sums(x, w, grads, norm, strides, rows, block, interpret):
  """Each BatchNorm's sum(dy) and sum(dy * xhat) over the images: (convs, 2, 1, c)."""
  sums = jax.ShapeDtypeStruct((len(strides), 2, 1, x.shape[3]), F32)
  kernel = functools.partial(_bn_sums_kernel, strides=strides)
  in_specs = [*_x_specs(x, rows, 1, block), _channels_spec(w, block), _channels_spec(norm, block),
              *(_rows_spec(g.shape, rows // s, block) for g, s in zip(grads, strides))]
  cost = _forward_cost(x, grads, rows, w, norm, *grads, sums, written=False)
  return call(kernel, _grid(x, block, rows), _SUMMED, in_specs, _channels_spec(sums, block), [],
              sums, cost, interpret, x, x, x, w, norm, *grads)


def _grad_specs(grad, stride, rows, block):
  """A gradient's blocks with the rows dx needs: stride 1 one row either side, stride 2 the row
  below (`_conv_grad_rows`)."""
  main = _rows_spec(grad.shape, rows // stride, block)
  below = _halo_spec(grad.shape, rows // stride, 1, block, True)
  if stride == 2:
    return [main, below]
  return [main, _halo_spec(grad.shape, rows, 1, block, False), below]


def _backward_cost(x, w, grads, strides, rows, halo, dx, dw, *bn):
  """Per output row of a stride-1 gradient, 9 multiply-adds for dx and 9 for dw at each position
  (stride 2: its gradient spread to the even rows, the others skipped); with a BatchNorm (`bn`),
  9 more to recompute each output, the halo's rows included."""
  macs = sum(2 * TAPS * math.prod(x.shape) // s for s in strides)
  grad_rows = [rows // s + (2 if s == 1 else 1) for s in strides]
  if bn:
    macs += sum(TAPS * math.prod(g.shape) * n * s // rows
                for g, n, s in zip(grads, grad_rows, strides))
  read = sum(nbytes(g) * n * s / rows for g, n, s in zip(grads, grad_rows, strides))
  moved = _read(x, rows, halo) + read + nbytes(w, dx, dw, *bn)
  return pl.CostEstimate(flops=2 * macs, transcendentals=0, bytes_accessed=int(moved))


def backward(x, w, grads, strides, rows, block, interpret, bn=None):
  """dx and dw (convs, 9, 1, c) float32; with `bn` (convs, 5, 1, c), the gradients are the
  BatchNorms' outputs' (`_conv_grad_rows`)."""
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, F32))
  extra, halo = ((), 1) if bn is None else ((bn,), 2)
  kernel = functools.partial(_backward_kernel, strides=strides, normalise=bn is not None)
  grad_specs, grad_args = [], []
  for g, s in zip(grads, strides):
    specs = _grad_specs(g, s, rows, block)
    grad_specs += specs
    grad_args += [g] * len(specs)
  in_specs = [*_x_specs(x, rows, halo, block), _channels_spec(w, block),
              *(_channels_spec(a, block) for a in extra), *grad_specs]
  return call(kernel, _grid(x, block, rows), _SUMMED, in_specs,
              [_rows_spec(x.shape, rows, block), _channels_spec(w, block)], [], outs,
              _backward_cost(x, w, grads, strides, rows, halo, *outs, *extra), interpret,
              x, x, x, w, *extra, *grad_args)
