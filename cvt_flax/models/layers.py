"""Building blocks of CvT that Flax does not ship in the form CvT needs.

All tensors are NHWC (images, feature maps) or (batch, tokens, channels).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def quick_gelu(x):
  """The official CvT activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  """Exact erf GELU, as HF transformers' CvT (flax's `nnx.gelu` default is the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': exact_gelu}


# ----------------------------------------------------------------------------------------------------
# Initialisers matching the official code (timm `trunc_normal_` and torch's default conv init).

def trunc_normal(std=0.02):
  """timm's trunc_normal_(std) truncates at +-2 in absolute value, i.e. +-2/std standard deviations."""
  def init(key, shape, dtype=jnp.float32):
    bound = 2.0 / std
    return jax.random.truncated_normal(key, -bound, bound, shape, dtype) * std
  return init


def torch_default_uniform(fan_in):
  """torch's default Conv/Linear init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)), weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear_kernel_init(init_name):
  if init_name == 'xavier':
    return nnx.initializers.xavier_uniform()
  return trunc_normal(0.02)


# ----------------------------------------------------------------------------------------------------
# A fusion barrier for the backward pass.

@jax.custom_vjp
def gradient_fusion_barrier(x):
  """Identity whose backward pass materialises the incoming gradient.

  XLA:CPU fuses the elementwise parts of the residual stream's gradient (LayerNorm backward and the
  residual sums) across blocks and duplicates the whole chain into every block's weight-gradient
  fusions: with small per-block tensors (CvT-W24 at 384, batch 2) the backward pass became
  quadratic in depth, 2.6x slower. XLA:CPU drops optimisation barriers before fusion, but a
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
# Depthwise convolution with a choice of implementation.

def resolve_dwconv_impl(impl: str) -> str:
  if impl == 'auto':
    return 'shifts' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def depthwise_conv(x, kernel, stride: int, padding: int, impl: str):
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel, explicit symmetric zero padding.

  'xla' lowers to one grouped convolution; 'shifts' writes it as k*k strided slices times a
  per-channel weight, which XLA:CPU fuses into one loop and runs an order of magnitude faster than
  its grouped-conv kernel (its gradient is written out the same way). Both compute the same sum;
  they differ only in summation order.
  """
  if resolve_dwconv_impl(impl) == 'xla':
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])
  return _depthwise_conv_shifts(x, kernel, stride, padding)


def _windows(x, k, stride, padding):
  """((i, j), the strided window of padded `x` that kernel tap (i, j) multiplies), for every tap."""
  b, h, w, c = x.shape
  ho = (h + 2 * padding - k) // stride + 1
  wo = (w + 2 * padding - k) // stride + 1
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
def _depthwise_conv_shifts(x, kernel, stride, padding):
  return _shifted_sum(x, kernel, stride, padding)


def _depthwise_conv_shifts_fwd(x, kernel, stride, padding):
  return _shifted_sum(x, kernel, stride, padding), (x, kernel)


def _depthwise_conv_shifts_bwd(stride, padding, residuals, grad):
  """Autodiff of the slices would sum k*k zero-padded full-size copies of the gradient; written
  out, the input gradient is one more fused shifted sum and the kernel gradient k*k reductions
  (2-4x faster in training on CPU)."""
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


_depthwise_conv_shifts.defvjp(_depthwise_conv_shifts_fwd, _depthwise_conv_shifts_bwd)


class DepthwiseConv(nnx.Module):
  """Depthwise conv without bias. `kernel` is (k, k, 1, C): torch's (C, 1, k, k) transposed (2, 3, 1, 0)."""

  def __init__(self, channels, kernel_size, stride, padding, *, impl='auto', dtype=jnp.float32, rngs):
    self.stride, self.padding, self.impl, self.dtype = stride, padding, impl, dtype
    init = torch_default_uniform(kernel_size * kernel_size)
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def __call__(self, x):
    return depthwise_conv(x.astype(self.dtype), self.kernel.value.astype(self.dtype),
                          self.stride, self.padding, self.impl)


# ----------------------------------------------------------------------------------------------------
# Attention core.

# 'blocked' attention computes scores in blocks of about a core's L2 cache, and only when all the
# scores would be much larger than that (below, one pass over them is cheaper than a loop).
ATTENTION_BLOCK_BYTES = 2 ** 21
ATTENTION_BLOCKING_MIN_BYTES = 8 * ATTENTION_BLOCK_BYTES


def resolve_attention_impl(impl: str) -> str:
  if impl == 'auto':
    return 'blocked' if jax.default_backend() == 'cpu' else 'deferred'
  return impl


def _deferred_attention(q, k, v, scale):
  """(..., q, d) queries against (..., k, d) keys and values: the output, and each query row's
  log-sum-exp of the scores (float32; the blocked backward pass recomputes probabilities from it)."""
  scores = jnp.einsum('...qd,...kd->...qk', q, k).astype(jnp.float32) * scale
  # The max only keeps exp in range; softmax does not depend on it, so no gradient flows into it.
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  unnormalised = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum('...qk,...kd->...qd', unnormalised.astype(v.dtype), v)
  return (out.astype(jnp.float32) / row_sum).astype(v.dtype), row_max + jnp.log(row_sum)


def _blocked_attention(q, k, v, scale):
  """`_deferred_attention` one cache-sized block of queries at a time (a loop, not a grid)."""
  b, h, nq, d = q.shape
  nk = k.shape[2]
  budget = max(1, ATTENTION_BLOCK_BYTES // (4 * nk))  # query rows whose scores fit in one block
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
    if q_blocks.shape[0] == 1:  # no inner loop of one trip (it measured 5-10% slower on XLA:CPU)
      return _deferred_attention(q_blocks, k[None], v[None], scale)
    return jax.lax.map(lambda q_block: _deferred_attention(q_block, k, v, scale), q_blocks)
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
      probs = jnp.exp(jnp.einsum('qd,kd->qk', q, k) * scale - logsumexp)
      dv = dv + jnp.einsum('qk,qd->kd', probs, grad)
      d_scores = probs * (jnp.einsum('qd,kd->qk', grad, v)
                          - jnp.sum(grad * out, axis=-1, keepdims=True)) * scale
      dk = dk + jnp.einsum('qk,qd->kd', d_scores, q)
      return (dk, dv), jnp.einsum('qk,kd->qd', d_scores, k)

    zeros = jnp.zeros(k.shape, f32)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), (q_blocks, out, logsumexp, grad))
    return dq, dk, dv

  q, k, v, out, logsumexp = residuals
  dq, dk, dv = jax.lax.map(pair, (q, k, v, out, logsumexp, grad), batch_size=pairs_per_step)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_pairs.defvjp(_blocked_pairs_fwd, _blocked_pairs_bwd)


def attention(q, k, v, scale, *, impl='softmax', dropout=None, record=None):
  """softmax(q k^T * scale) v for (b, heads, tokens, d) q, k, v; scores and softmax in float32.

  `dropout` (a callable, or None) is applied to the attention probabilities and `record` (a callable,
  or None) receives them, as (b, heads, q, k) float32; either one selects the 'softmax' path.
  * 'softmax': the probabilities, then their product with v, as the official code.
  * 'deferred': v times the unnormalised exp(scores - max), then the (q, d) result divided by the row
    sums. For CvT's first stage (3136 queries x 784 keys, d = 64) that saves a pass over, and a
    saved-for-backward copy of, a 12x larger tensor.
  * 'blocked': 'deferred' for a block of queries of one (image, head) pair at a time, so that the
    scores stay in cache between the two matmuls: 2x faster on CPU, where attention over 3136
    tokens is bound by memory bandwidth. Its backward pass recomputes the scores block by block
    instead of keeping them (0.4 GiB less for CvT-13 training at batch 32). A sequential loop:
    slower on accelerators.
  * 'auto': 'blocked' on CPU, 'deferred' elsewhere.
  All compute the same function; they differ in summation order only.
  """
  impl = resolve_attention_impl(impl)
  if impl == 'softmax' or dropout is not None or record is not None:
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) * scale, axis=-1)
    if record is not None:
      record(probs)
    if dropout is not None:
      probs = dropout(probs)
    return jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
  if impl == 'blocked' and 4 * q.size // q.shape[-1] * k.shape[2] > ATTENTION_BLOCKING_MIN_BYTES:
    return _blocked_attention(q, k, v, scale)
  return _deferred_attention(q, k, v, scale)[0]


# ----------------------------------------------------------------------------------------------------
# BatchNorm with PyTorch's exact semantics.

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
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean.value, self.var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = math.prod(x.shape[:-1])
      unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      m = self.momentum
      self.mean.value = m * self.mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      self.var.value = m * self.var.value + (1 - m) * unbiased
      self.num_batches_tracked.value = self.num_batches_tracked.value + 1
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale.value + self.bias.value
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------------
# Average pooling as torch.nn.AvgPool2d(ceil_mode=True, count_include_pad=True).

def ceil_pool_output_size(n, k, s, p):
  """Output length of torch's ceil-mode pooling along an axis of length n."""
  out = -(-(n + 2 * p - k) // s) + 1
  if (out - 1) * s >= n + p:  # torch drops a last window that starts inside the right padding
    out -= 1
  return out


def _ceil_pool_divisors(n, k, s, p):
  """Output length and per-output window sizes of torch's ceil-mode pooling along one axis."""
  out = ceil_pool_output_size(n, k, s, p)
  starts = np.arange(out) * s - p
  # Windows count the zero padding but not the ceil-mode overhang past it.
  sizes = np.minimum(starts + k, n + p) - starts
  return out, sizes.astype(np.float32)


def avg_pool_ceil(x, kernel_size, stride, padding):
  _, h, w, _ = x.shape
  k, s, p = kernel_size, stride, padding
  ho, dh = _ceil_pool_divisors(h, k, s, p)
  wo, dw = _ceil_pool_divisors(w, k, s, p)
  extra_h = max((ho - 1) * s + k - (h + 2 * p), 0)
  extra_w = max((wo - 1) * s + k - (w + 2 * p), 0)
  # A concrete numpy zero, not jnp.array: under jit the latter is traced, so JAX no longer sees a
  # sum (reduce_window_sum) and the generic reduce_window has no gradient.
  summed = jax.lax.reduce_window(
      x, np.array(0, x.dtype), jax.lax.add, (1, k, k, 1), (1, s, s, 1),
      ((0, 0), (p, p + extra_h), (p, p + extra_w), (0, 0)))
  summed = summed[:, :ho, :wo]
  return summed / jnp.asarray(np.outer(dh, dw)[None, :, :, None], x.dtype)
