"""Multi-head attention on the model's own token layout, every key of an image in VMEM, as Pallas
(Mosaic) kernels for TPU, forward and backward.

`token_attention(q, k, v, heads, scale)` takes the q, k, v linear layers' outputs as they are,
(batch, tokens, channels) with the heads side by side in the channels, and returns the attention's
output in the same layout, ready for the output linear layer. Nothing is transposed in HBM: a
kernel slices each head's channels out of the lanes in VMEM. Where an image's keys fit in VMEM
(every CvT stage up to large resolutions) the softmax is computed whole, not online: the forward
pass keeps no row statistics, and the backward kernel recomputes the probabilities from q and k
and each row's correction (`sum(p * dp)`) from them, so it reads q, k, v and the output gradient
and nothing else.

Against `attention.flash_attention` (blocks of 128 keys, the heads split out of the channels)
this moves no padding through HBM (CvT-13's last stage has 50 keys: a block of 128 would be 61%
padding) and no head transposes; against XLA's attention the (queries, keys) scores never leave
VMEM.

Grid: (image blocks, query blocks). An image block is several images, processed one after another
in the kernel; a query block is all the queries where their scores fit, else a multiple of 16
rows, the last one running past the end: its rows are computed and never written, and zeroed in
the backward pass so that they add nothing to the key gradients, which accumulate over the query
blocks in float32. Each kernel declares a `pl.CostEstimate` of its matmuls, its `exp`s and the
bytes it moves (`forward_cost`, `backward_cost`, held to these formulas by the tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models.tpu.blocks import (F32, NN, NT, TN, VMEM_BUDGET, call, dot, nbytes,
                                        rows_valid, zero_outside)

LANES = 128
ROWS = 16  # a bfloat16 tile's rows: query blocks shorter than all the queries are multiples of it
_MAX_IMAGES = 8  # images per grid step: enough to amortise a step's overhead on small stages
# Float32 (queries, keys) arrays live at once in the backward kernel: scores, probabilities,
# their gradient and the scores' gradient, with one spare for Mosaic's temporaries.
_LIVE_SCORES = 5
_SEMANTICS = ('parallel', 'arbitrary')  # image blocks; query blocks (the key gradients add up)


def _round_up(n: int, m: int) -> int:
  return pl.cdiv(n, m) * m


def _vmem_bytes(images: int, queries: int, keys: int, channels: int, itemsize: int) -> int:
  """The backward kernel's working set (the larger one): q, the output gradient and dq blocks,
  k, v, dk, dv blocks, each double-buffered, and the float32 key-gradient accumulators, per
  image of the block; for the image in hand, one head's score-sized arrays and the float32 dq,
  dk and dv, every head's part and their concatenation. (Without the last term CvT-W24's last
  stage at 384 px, 16 heads of 577 queries and 145 keys, planned 13.6 MiB, and in its train step,
  under remat and accumulation, Mosaic asked for 16.3 MiB: over the 16 MiB limit.)"""
  lanes = _round_up(channels, LANES)
  rows_q, rows_k = _round_up(queries, ROWS), _round_up(keys, ROWS)
  per_image = 2 * (3 * rows_q + 4 * rows_k) * lanes * itemsize + 2 * rows_k * lanes * 4
  scores = _LIVE_SCORES * rows_q * _round_up(keys, LANES) * 4
  results = 2 * (rows_q + 2 * rows_k) * lanes * 4
  return images * per_image + scores + results


def plan(b: int, nq: int, nk: int, c: int, itemsize: int) -> tuple[int, int] | None:
  """(images, queries) per grid step for (b, nq, c) queries against (b, nk, c) keys, or None
  where one image's keys and a block of 16 queries do not fit VMEM_BUDGET."""
  query_blocks = [nq] + [q for q in (2048, 1024, 512, 256, 128, 64, ROWS) if q < nq]
  for queries in query_blocks:
    if _vmem_bytes(1, queries, nk, c, itemsize) <= VMEM_BUDGET:
      images = max(i for i in range(1, min(b, _MAX_IMAGES) + 1)
                   if b % i == 0 and _vmem_bytes(i, queries, nk, c, itemsize) <= VMEM_BUDGET)
      return images, queries
  return None


def fits(b: int, nq: int, nk: int, c: int, itemsize: int) -> bool:
  return plan(b, nq, nk, c, itemsize) is not None


# ----------------------------------------------------------------------------------------------------
# Costs, from the operands' shapes: (b, nq, c) queries, (b, nk, c) keys and values. The keys are
# read once per block of queries.

def _pairs(q, k) -> int:
  """(query, key) scores per head summed over the heads, times the head width: b nq nk c."""
  return q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]


def forward_cost(q, k, v, out, heads: int, query_blocks: int) -> pl.CostEstimate:
  """Two matmuls (scores, probabilities v)."""
  return pl.CostEstimate(flops=4 * _pairs(q, k), transcendentals=_pairs(q, k) * heads // q.shape[2],
                         bytes_accessed=nbytes(q, out) + query_blocks * nbytes(k, v))


def backward_cost(q, k, v, grad, dq, dk, dv, heads: int, query_blocks: int) -> pl.CostEstimate:
  """Five matmuls (scores, grad v^T, ds k, ds^T q, p^T grad)."""
  return pl.CostEstimate(flops=10 * _pairs(q, k),
                         transcendentals=_pairs(q, k) * heads // q.shape[2],
                         bytes_accessed=nbytes(q, grad, dq, dk, dv) + query_blocks * nbytes(k, v))


# ----------------------------------------------------------------------------------------------------
# Kernels: one image of the block at a time, one head at a time (a static slice of the lanes).

def _heads(x, heads: int):
  d = x.shape[-1] // heads
  return [x[:, h * d:(h + 1) * d] for h in range(heads)]


def _exp_scores(q, k, scale):
  """exp(q k^T * scale - row max) (float32, (queries, keys)) and the row sums."""
  scores = dot(q, k, NT) * scale
  unnormalised = jnp.exp(scores - scores.max(axis=1, keepdims=True))
  return unnormalised, unnormalised.sum(axis=1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, *, heads, scale):
  def image(i, carry):
    q, k, v = (_heads(ref[i], heads) for ref in (q_ref, k_ref, v_ref))
    outs = []
    for q_h, k_h, v_h in zip(q, k, v):
      unnormalised, row_sum = _exp_scores(q_h, k_h, scale)
      outs.append(dot(unnormalised.astype(v_h.dtype), v_h, NN) / row_sum)
    out_ref[i] = jnp.concatenate(outs, axis=1).astype(out_ref.dtype)
    return carry

  jax.lax.fori_loop(0, out_ref.shape[0], image, 0)


def _backward_kernel(q_ref, k_ref, v_ref, grad_ref, dq_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                     heads, scale, num_queries):
  query_block = pl.program_id(1)

  @pl.when(query_block == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

  # Queries past the end (the last block's padding) are zeroed: they add nothing to dk and dv.
  valid = rows_valid(q_ref.shape[1], query_block * q_ref.shape[1], num_queries)

  def image(i, carry):
    q, grad = (_heads(zero_outside(ref[i], valid), heads) for ref in (q_ref, grad_ref))
    k, v = (_heads(ref[i], heads) for ref in (k_ref, v_ref))
    dq, dk, dv = [], [], []
    for q_h, k_h, v_h, g_h in zip(q, k, v, grad):
      unnormalised, row_sum = _exp_scores(q_h, k_h, scale)
      probs = unnormalised / row_sum
      d_probs = dot(g_h, v_h, NT)
      ds = (probs * (d_probs - jnp.sum(probs * d_probs, axis=1, keepdims=True))
            * scale).astype(q_h.dtype)
      dq.append(dot(ds, k_h, NN))
      dk.append(dot(ds, q_h, TN))
      dv.append(dot(probs.astype(g_h.dtype), g_h, TN))
    dq_ref[i] = jnp.concatenate(dq, axis=1).astype(dq_ref.dtype)
    dk_acc[i] += jnp.concatenate(dk, axis=1)
    dv_acc[i] += jnp.concatenate(dv, axis=1)
    return carry

  jax.lax.fori_loop(0, q_ref.shape[0], image, 0)

  @pl.when(query_block == pl.num_programs(1) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------
# The calls.

def _specs(q, k):
  b, nq, c = q.shape
  images, queries = plan(b, nq, k.shape[1], c, q.dtype.itemsize)
  grid = (b // images, pl.cdiv(nq, queries))
  query = pl.BlockSpec((images, queries, c), lambda i, j: (i, j, 0))
  key = pl.BlockSpec((images, k.shape[1], c), lambda i, j: (i, 0, 0))
  return grid, query, key


def _forward(q, k, v, heads, scale, interpret):
  grid, query, key = _specs(q, k)
  out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  return call(functools.partial(_forward_kernel, heads=heads, scale=scale), grid,
              ('parallel', 'parallel'), [query, key, key], query, [], out,
              forward_cost(q, k, v, out, heads, grid[1]), interpret, q, k, v)


def _backward(q, k, v, grad, heads, scale, interpret):
  grid, query, key = _specs(q, k)
  dq, dk, dv = (jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (q, k, v))
  accumulator = pltpu.VMEM((key.block_shape[0], *k.shape[1:]), F32)
  kernel = functools.partial(_backward_kernel, heads=heads, scale=scale, num_queries=q.shape[1])
  return call(kernel, grid, _SEMANTICS, [query, key, key, query], [query, key, key],
              [accumulator, accumulator], (dq, dk, dv),
              backward_cost(q, k, v, grad, dq, dk, dv, heads, grid[1]), interpret,
              q, k, v, grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def token_attention(q, k, v, heads: int, scale: float, interpret: bool = False):
  """softmax(q_h k_h^T * scale) v_h for each head h, on (b, tokens, heads * d) q, k, v whose
  channels hold the heads side by side; the output in the same layout. Needs `fits`.
  `interpret`: run in Pallas's TPU interpreter (any backend) instead of compiling with Mosaic."""
  return _forward(q, k, v, heads, scale, interpret)


def _token_attention_forward(q, k, v, heads, scale, interpret):
  return _forward(q, k, v, heads, scale, interpret), (q, k, v)


def _token_attention_backward(heads, scale, interpret, residuals, grad):
  return _backward(*residuals, grad, heads, scale, interpret)


token_attention.defvjp(_token_attention_forward, _token_attention_backward)
