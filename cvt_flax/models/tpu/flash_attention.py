"""Flash attention as Pallas (Mosaic) kernels for TPU, forward and backward.

`flash_attention(q, k, v, scale)` computes `layers.deferred_attention`'s output without the
(queries, keys) score matrix ever reaching HBM: each kernel holds one block of queries against one
block of keys in VMEM and keeps running row statistics (the online softmax). The backward pass
(a `jax.custom_vjp`) recomputes the probabilities from the forward pass's row log-sum-exp, as
`layers.recompute_attention` does, in two kernels: dq (keys innermost) and dk, dv (queries
innermost). Accumulation is float32; the matmuls take the inputs' dtype.

Any sequence lengths: the grids run over whole blocks of BLOCK_Q queries and BLOCK_K keys (the
TPU's lane width), and the last block of each may run past the end. Keys past the end are masked
out of the softmax and their rows zeroed; queries past the end are computed and never written, and
add nothing to the key gradients. Nothing is padded in HBM. The kernels still compute the whole
last blocks: CvT-13's last stage attends to 50 keys in a block of 128.

Every kernel declares a `pl.CostEstimate` of what it does: the FLOPs of its matmuls, its `exp`s,
and the bytes it moves, counting each block as often as the grid reads it (`*_cost` below, held
to these formulas by the tests). `interpret=True` runs the kernels in Pallas's TPU interpreter
(on a CPU, for the tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cvt_flax.models.tpu.blocks import (F32, NN, NT, TN, call, dot, nbytes, rows_valid,
                                        zero_outside)

BLOCK_Q = 128
BLOCK_K = 128
_MASKED = -1e30  # the score of a key past the end: exp underflows to 0, and no inf - inf = nan


def _cols_valid(start, count: int):
  return start + jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK_Q), 1) < count


# ----------------------------------------------------------------------------------------------------
# Costs: what each kernel computes and moves, from its operands' shapes: (bh, nq, d) queries,
# (bh, nk, d) keys. Blocks that run past the end of an axis count whole, as the grid moves them.

def _blocks(q, k):
  return pl.cdiv(q.shape[1], BLOCK_Q), pl.cdiv(k.shape[1], BLOCK_K)


def _pairs(q, k) -> int:
  """Scores computed: every (query, key) of every block pair, padding included."""
  q_blocks, k_blocks = _blocks(q, k)
  return q.shape[0] * q_blocks * BLOCK_Q * k_blocks * BLOCK_K


def forward_cost(q, k, v, out, lse) -> pl.CostEstimate:
  """Two matmuls per block pair; k and v are read once per block of queries."""
  d = q.shape[2]
  return pl.CostEstimate(flops=4 * _pairs(q, k) * d, transcendentals=_pairs(q, k),
                         bytes_accessed=nbytes(q, out, lse) + _blocks(q, k)[0] * nbytes(k, v))


def dq_cost(q, k, v, grad, lse, delta, dq) -> pl.CostEstimate:
  """Three matmuls per block pair (scores, v grad^T, ds^T k); k and v read per block of queries."""
  d = q.shape[2]
  return pl.CostEstimate(flops=6 * _pairs(q, k) * d, transcendentals=_pairs(q, k),
                         bytes_accessed=nbytes(q, grad, lse, delta, dq)
                         + _blocks(q, k)[0] * nbytes(k, v))


def dkv_cost(q, k, v, grad, lse, delta, dk, dv) -> pl.CostEstimate:
  """Four matmuls per block pair (scores, v grad^T, p grad, ds q); the query-side arrays are read
  once per block of keys."""
  d = q.shape[2]
  return pl.CostEstimate(flops=8 * _pairs(q, k) * d, transcendentals=_pairs(q, k),
                         bytes_accessed=nbytes(k, v, dk, dv)
                         + _blocks(q, k)[1] * nbytes(q, grad, lse, delta))


# ----------------------------------------------------------------------------------------------------
# Kernels. Grid: (batch * heads, outer block, inner block); the inner axis accumulates. Scores are
# computed transposed, (keys, queries), so that the row statistics (max, sum, log-sum-exp) are
# (1, queries) lane vectors, stored as (bh, 1, nq): a (bh, nq, 1) array would fill one 128-lane
# tile per query in HBM.

def _scores_t(q, k, scale, key_start, num_keys):
  """k q^T * scale for one block pair (float32, (keys, queries)), keys past the end masked."""
  scores = dot(k, q, NT) * scale
  return jnp.where(rows_valid(BLOCK_K, key_start, num_keys), scores, _MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale,
                    num_keys):
  key_block = pl.program_id(2)

  @pl.when(key_block == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _MASKED, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  key_start = key_block * BLOCK_K
  valid = rows_valid(BLOCK_K, key_start, num_keys)
  k, v = zero_outside(k_ref[...], valid), zero_outside(v_ref[...], valid)
  scores = _scores_t(q_ref[...], k, scale, key_start, num_keys)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, scores.max(axis=0, keepdims=True))
  probs = jnp.exp(scores - m_new)
  alpha = jnp.exp(m_prev - m_new)
  l_ref[...] = alpha * l_ref[...] + probs.sum(axis=0, keepdims=True)
  acc_ref[...] = alpha * acc_ref[...] + dot(v, probs.astype(v.dtype), TN)  # (d, queries)
  m_ref[...] = m_new

  @pl.when(key_block == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = (acc_ref[...] / l_ref[...]).T.astype(out_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _probs_and_ds_t(q, k, v, grad, lse, delta, scale, key_start, num_keys):
  """The recomputed probabilities and the scores' gradient of one block pair, (keys, queries)."""
  probs = jnp.exp(_scores_t(q, k, scale, key_start, num_keys) - lse)
  d_probs = dot(v, grad, NT)
  return probs, probs * (d_probs - delta) * scale


def _dq_kernel(q_ref, k_ref, v_ref, grad_ref, lse_ref, delta_ref, dq_ref, acc_ref, *, scale,
               num_keys):
  key_block = pl.program_id(2)

  @pl.when(key_block == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  key_start = key_block * BLOCK_K
  valid = rows_valid(BLOCK_K, key_start, num_keys)
  k, v = zero_outside(k_ref[...], valid), zero_outside(v_ref[...], valid)
  _, ds = _probs_and_ds_t(q_ref[...], k, v, grad_ref[...], lse_ref[...], delta_ref[...], scale,
                          key_start, num_keys)
  acc_ref[...] += dot(ds.astype(k.dtype), k, TN)

  @pl.when(key_block == pl.num_programs(2) - 1)
  def _():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, grad_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                *, scale, num_keys, num_queries):
  key_block, query_block = pl.program_id(1), pl.program_id(2)

  @pl.when(query_block == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

  # Queries past the end (the last block's padding) contribute nothing: zero all they bring.
  query_start = query_block * BLOCK_Q
  rows, cols = (rows_valid(BLOCK_Q, query_start, num_queries),
                _cols_valid(query_start, num_queries))
  q, grad = zero_outside(q_ref[...], rows), zero_outside(grad_ref[...], rows)
  lse, delta = zero_outside(lse_ref[...], cols), zero_outside(delta_ref[...], cols)
  probs, ds = _probs_and_ds_t(q, k_ref[...], v_ref[...], grad, lse, delta, scale,
                              key_block * BLOCK_K, num_keys)
  dv_acc[...] += dot(probs.astype(grad.dtype), grad, NN)
  dk_acc[...] += dot(ds.astype(q.dtype), q, NN)

  @pl.when(query_block == pl.num_programs(2) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------
# The calls, on (batch * heads, tokens, head dim) arrays; lse and delta are (batch * heads, 1, nq).

_SEMANTICS = ('parallel', 'parallel', 'arbitrary')  # the inner axis accumulates


def _call(kernel, grid, in_specs, out_specs, scratch, out_shape, cost, interpret, *args):
  return call(kernel, grid, _SEMANTICS, in_specs, out_specs, scratch, out_shape, cost, interpret,
              *args)


def _specs(d, keys_inner: bool):
  """Block specs of q, k, v, grad, lse, delta. Grid (bh, query block, key block) when the keys are
  the inner axis, else (bh, key block, query block). lse and delta are (bh, 1, nq)."""
  if keys_inner:
    query, key, stats = (lambda i, j, kk: (i, j, 0)), (lambda i, j, kk: (i, kk, 0)), (
        lambda i, j, kk: (i, 0, j))
  else:
    query, key, stats = (lambda i, kk, j: (i, j, 0)), (lambda i, kk, j: (i, kk, 0)), (
        lambda i, kk, j: (i, 0, j))
  rows = lambda n, index: pl.BlockSpec((None, n, d), index)
  statistics = pl.BlockSpec((None, 1, BLOCK_Q), stats)
  return [rows(BLOCK_Q, query), rows(BLOCK_K, key), rows(BLOCK_K, key), rows(BLOCK_Q, query),
          statistics, statistics]


def _forward(q, k, v, scale, interpret):
  bh, nq, d = q.shape
  q_blocks, k_blocks = _blocks(q, k)
  specs = _specs(d, keys_inner=True)
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bh, 1, nq), F32))
  return _call(functools.partial(_forward_kernel, scale=scale, num_keys=k.shape[1]),
               (bh, q_blocks, k_blocks), specs[:3], [specs[0], specs[4]],
               [pltpu.VMEM((1, BLOCK_Q), F32), pltpu.VMEM((1, BLOCK_Q), F32),
                pltpu.VMEM((d, BLOCK_Q), F32)],
               out_shape, forward_cost(q, k, v, *out_shape), interpret, q, k, v)


def _dq(q, k, v, grad, lse, delta, scale, interpret):
  bh, nq, d = q.shape
  q_blocks, k_blocks = _blocks(q, k)
  specs = _specs(d, keys_inner=True)
  dq = jax.ShapeDtypeStruct(q.shape, q.dtype)
  return _call(functools.partial(_dq_kernel, scale=scale, num_keys=k.shape[1]),
               (bh, q_blocks, k_blocks), specs, specs[0], [pltpu.VMEM((BLOCK_Q, d), F32)], dq,
               dq_cost(q, k, v, grad, lse, delta, dq), interpret, q, k, v, grad, lse, delta)


def _dkv(q, k, v, grad, lse, delta, scale, interpret):
  bh, nq, d = q.shape
  q_blocks, k_blocks = _blocks(q, k)
  specs = _specs(d, keys_inner=False)
  dk, dv = jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)
  kernel = functools.partial(_dkv_kernel, scale=scale, num_keys=k.shape[1], num_queries=nq)
  return _call(kernel, (bh, k_blocks, q_blocks), specs, [specs[1], specs[2]],
               [pltpu.VMEM((BLOCK_K, d), F32), pltpu.VMEM((BLOCK_K, d), F32)], (dk, dv),
               dkv_cost(q, k, v, grad, lse, delta, dk, dv), interpret,
               q, k, v, grad, lse, delta)


# ----------------------------------------------------------------------------------------------------
# The attention: (batch, heads, tokens, d) in and out, as `layers.deferred_attention` takes them.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def flash_attention(q, k, v, scale, interpret=False):
  """softmax(q k^T * scale) v for (b, heads, tokens, d) queries, keys and values (any lengths).
  `interpret`: run in Pallas's TPU interpreter (any backend) instead of compiling with Mosaic."""
  return _flash_forward(q, k, v, scale, interpret)[0]


def _merge_heads(x):
  return x.reshape(-1, *x.shape[2:])  # (b, h, n, d) -> (b * h, n, d): no data moves


def _flash_forward(q, k, v, scale, interpret):
  flat = tuple(_merge_heads(t) for t in (q, k, v))
  out, lse = _forward(*flat, scale, interpret)
  return out.reshape(q.shape), (*flat, out, lse)


def _flash_backward(scale, interpret, residuals, grad):
  q, k, v, out, lse = residuals
  shape, grad = grad.shape, _merge_heads(grad)
  # Each query's grad . out, the softmax's correction (float32; one fused pass).
  delta = jnp.sum(grad.astype(F32) * out.astype(F32), axis=-1)[:, None, :]
  dq = _dq(q, k, v, grad, lse, delta, scale, interpret)
  dk, dv = _dkv(q, k, v, grad, lse, delta, scale, interpret)
  b, h = shape[:2]
  return dq.reshape(shape), dk.reshape(b, h, *k.shape[1:]), dv.reshape(b, h, *v.shape[1:])


flash_attention.defvjp(_flash_forward, _flash_backward)
