"""The CPU backend: computations that are only faster on XLA:CPU.

Everything here computes the same function as the plain XLA path it replaces (differences are float
summation order); `cvt_flax.models.compute` chooses them when the devices are CPUs, never on GPU
or TPU, where each of them would be slower (sequential loops, opaque conditionals).

  * `depthwise_conv_shifts`: a depthwise conv as k*k shifted multiply-adds, with its gradient
    written out the same way (XLA:CPU's grouped-conv kernel is an order of magnitude slower).
  * `attention`: attention in cache-sized blocks of queries, with a recomputing backward.
  * `gradient_fusion_barrier`: stops XLA:CPU's fusion of the residual gradient across blocks.

XLA:CPU's compiler options and the release of the compiler's memory are `cvt_flax.runtime.compiler`'s.
"""
from __future__ import annotations

import functools
import glob
import os

import jax
import jax.numpy as jnp

from cvt_flax.models import layers

# ----------------------------------------------------------------------------------------------------
# A fusion barrier for the backward pass.

@jax.custom_vjp
def gradient_fusion_barrier(x):
  """Identity whose backward pass materialises the incoming gradient.

  XLA:CPU fuses the elementwise parts of the residual stream's gradient (LayerNorm backward and the
  residual sums) across blocks and duplicates the whole chain into every block's weight-gradient
  fusions: with small per-block tensors (CvT-W24 at 384, batch 2) the backward pass became
  quadratic in depth (benchmarks/RESULTS.md). XLA:CPU drops optimisation barriers before fusion, but a
  conditional is opaque to it; its predicate reads the data, so it cannot be folded away.
  """
  return x


def _barrier_fwd(x):
  return x, None


def _barrier_bwd(_, grad):
  first = grad.reshape(-1)[0]
  # Both branches are the identity; `+ 0` only keeps them distinct for XLA, which would otherwise
  # fold the conditional away.
  return (jax.lax.cond(first == first, lambda g: g, lambda g: g + 0, grad),)


gradient_fusion_barrier.defvjp(_barrier_fwd, _barrier_bwd)


# ----------------------------------------------------------------------------------------------------
# Depthwise convolution as shifted multiply-adds.

def _windows(x, k, stride, padding):
  """((i, j), the strided window of padded `x` that kernel tap (i, j) multiplies), for every tap."""
  b, h, w, c = x.shape
  ho, wo = (layers.conv_output_size(n, k, stride, padding) for n in (h, w))
  xp = jax.lax.pad(x, jnp.array(0, x.dtype), ((0, 0, 0), (padding, padding, 0),
                                               (padding, padding, 0), (0, 0, 0)))
  for i in range(k):
    for j in range(k):
      yield (i, j), jax.lax.slice(xp, (0, i, j, 0),
                                  (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                                  (1, stride, stride, 1))


def _shifted_sum(x, kernel, stride, padding):
  out = None
  for (i, j), window in _windows(x, kernel.shape[0], stride, padding):
    term = window * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifts(x, kernel, stride, padding):
  """`layers.depthwise_conv_xla` as k*k strided slices times a per-channel weight, which XLA:CPU
  fuses into one loop."""
  return _shifted_sum(x, kernel, stride, padding)


def _depthwise_conv_shifts_fwd(x, kernel, stride, padding):
  return _shifted_sum(x, kernel, stride, padding), (x, kernel)


def _depthwise_conv_shifts_bwd(stride, padding, residuals, grad):
  """Autodiff of the slices would sum k*k zero-padded full-size copies of the gradient; written
  out, the input gradient is one more fused shifted sum and the kernel gradient k*k reductions
  (faster in training on CPU: benchmarks/RESULTS.md)."""
  x, kernel = residuals
  k = kernel.shape[0]
  _, h, w, _ = x.shape
  _, ho, wo, _ = grad.shape
  # Input gradient = the transposed conv: the gradient dilated by the stride and padded so that a
  # stride-1 conv with the flipped kernel gives back (h, w); rows and columns that no window
  # reached (the output size rounds down) get zeros.
  lo = k - 1 - padding
  dilated = jax.lax.pad(grad, jnp.array(0, grad.dtype), (
      (0, 0, 0), (lo, h - 1 - (ho - 1) * stride + padding, stride - 1),
      (lo, w - 1 - (wo - 1) * stride + padding, stride - 1), (0, 0, 0)))
  dx = _shifted_sum(dilated, kernel[::-1, ::-1], 1, 0)
  # Kernel gradient, accumulated in float32 whatever the compute dtype (sums over B*H*W terms).
  dk = jnp.zeros(kernel.shape, jnp.float32)
  for (i, j), window in _windows(x, k, stride, padding):
    dk = dk.at[i, j, 0].set(jnp.sum(window * grad, axis=(0, 1, 2), dtype=jnp.float32))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_conv_shifts.defvjp(_depthwise_conv_shifts_fwd, _depthwise_conv_shifts_bwd)


# ----------------------------------------------------------------------------------------------------
# Attention in cache-sized blocks of queries.

def l2_cache_bytes(sysfs: str = '/sys/devices/system/cpu/cpu0/cache') -> int:
  """The L2 cache of one core as the OS reports it (Linux sysfs), or 1 MiB where it does not.

  CPUs differ by 4x here (Zen 3: 512 KiB, Zen 4: 1 MiB, recent Xeons: 2 MiB), so the attention
  blocks are sized from this rather than from one machine's constant.
  """
  for index in sorted(glob.glob(os.path.join(sysfs, 'index*'))):
    try:
      with open(os.path.join(index, 'level')) as f:
        level = f.read().strip()
      with open(os.path.join(index, 'size')) as f:
        size = f.read().strip()
    except OSError:
      continue
    if level == '2' and size:
      units = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30}
      return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
  return 2 ** 20


@functools.cache
def attention_block_bytes() -> int:
  """Blocks of scores of about a core's L2 cache: read from the OS at the first blocked attention
  that is traced, not at import."""
  return l2_cache_bytes()


# Blocked only when all the scores of a call would fill this many blocks (below, one pass over them
# is cheaper than a loop).
BLOCKING_MIN_BLOCKS = 8


def attention(q, k, v, scale):
  """`layers.deferred_attention` for (b, heads, tokens, d) q, k, v; blocked where the scores of a
  call are much larger than a core's cache (faster on CPU, where attention over 3136 tokens is
  bound by memory bandwidth: benchmarks/RESULTS.md). A sequential loop: slower on accelerators."""
  if 4 * q.size // q.shape[-1] * k.shape[2] > BLOCKING_MIN_BLOCKS * attention_block_bytes():
    return _blocked_attention(q, k, v, scale)
  return layers.deferred_attention(q, k, v, scale)[0]


def _blocked_attention(q, k, v, scale):
  """`deferred_attention` one cache-sized block of queries at a time (a loop, not a grid)."""
  b, h, nq, d = q.shape
  nk = k.shape[2]
  budget = max(1, attention_block_bytes() // (4 * nk))  # query rows whose scores fit in one block
  pairs_per_step = max(1, budget // nq)  # small pairs go several at a time
  q_blocks = -(-nq // budget)
  rows = -(-nq // q_blocks)  # large pairs: spread the queries evenly over the blocks
  padded = jnp.pad(q, ((0, 0), (0, 0), (0, q_blocks * rows - nq), (0, 0)))
  # One (image, head) pair per leading index: q (b*h, q_blocks, rows, d), k and v (b*h, nk, d).
  out = _blocked_pairs(padded.reshape(b * h, q_blocks, rows, d), k.reshape(b * h, nk, d),
                       v.reshape(b * h, nk, d), scale, pairs_per_step)
  return out.reshape(b, h, q_blocks * rows, d)[:, :, :nq]


def _blocked_pairs_fwd(q, k, v, scale, pairs_per_step):
  def pair(args):
    q_blocks, k, v = args
    if q_blocks.shape[0] == 1:  # no inner loop of one trip (slower on XLA:CPU)
      return layers.deferred_attention(q_blocks, k[None], v[None], scale)
    return jax.lax.map(lambda q_block: layers.deferred_attention(q_block, k, v, scale), q_blocks)
  out, logsumexp = jax.lax.map(pair, (q, k, v), batch_size=pairs_per_step)
  return out, (q, k, v, out, logsumexp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_pairs(q, k, v, scale, pairs_per_step):
  return _blocked_pairs_fwd(q, k, v, scale, pairs_per_step)[0]


def _blocked_pairs_bwd(scale, pairs_per_step, residuals, grad):
  """Recomputes each block's probabilities from q, k and the row log-sum-exp, as flash attention
  does, instead of keeping every block's scores from the forward pass (CvT-13's first stage: 3136 x
  784 floats per image). Accumulates in float32."""
  f32 = jnp.float32

  def pair(args):
    q_blocks, k, v, out, logsumexp, grad = args
    k, v = k.astype(f32), v.astype(f32)

    def block(carry, xs):
      dk, dv = carry
      q, out, logsumexp, grad = (t.astype(f32) for t in xs)
      dq, dk_block, dv_block = layers.attention_grads(q, k, v, out, logsumexp, grad, scale)
      return (dk + dk_block, dv + dv_block), dq

    zeros = jnp.zeros(k.shape, f32)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), (q_blocks, out, logsumexp, grad))
    return dq, dk, dv

  q, k, v, out, logsumexp = residuals
  dq, dk, dv = jax.lax.map(pair, (q, k, v, out, logsumexp, grad), batch_size=pairs_per_step)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_pairs.defvjp(_blocked_pairs_fwd, _blocked_pairs_bwd)
