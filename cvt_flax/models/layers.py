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
# Depthwise convolution and attention, as XLA computes them on every platform (the CPU-only
# alternatives are in `cvt_flax.models.cpu`; `cvt_flax.models.compute` chooses).

def depthwise_conv_xla(x, kernel, stride: int, padding: int):
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel, explicit symmetric zero padding: one
  grouped convolution."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


def softmax_attention(q, k, v, scale, *, dropout=None, record=None):
  """softmax(q k^T * scale) v as the official code computes it: the probabilities (float32), then
  their product with v. `dropout` (a callable) is applied to the probabilities and `record` (a
  callable) receives them, as (b, heads, q, k) float32."""
  probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) * scale, axis=-1)
  if record is not None:
    record(probs)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)


def attention_scores(q, k, scale):
  """q k^T * scale, as float32. The matmul's result keeps the inputs' dtype: with bf16 compute the
  (q, k) scores are stored as bf16 and widened where they are used (the widening fuses into the
  softmax; a float32 result would double the largest tensor's traffic)."""
  return jnp.einsum('...qd,...kd->...qk', q, k).astype(jnp.float32) * scale


def deferred_attention(q, k, v, scale):
  """Softmax attention normalised late: v times the unnormalised exp(scores - max), then the
  (q, d) result divided by the row sums. For CvT's first stage (3136 queries x 784 keys, d = 64)
  that saves a pass over, and a saved-for-backward copy of, a 12x larger tensor.

  (..., q, d) queries against (..., k, d) keys and values -> the output, and each query row's
  log-sum-exp of the scores (float32; `recompute_attention`'s backward pass recomputes
  probabilities from it)."""
  scores = attention_scores(q, k, scale)
  # The max only keeps exp in range; softmax does not depend on it, so no gradient flows into it.
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  unnormalised = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum('...qk,...kd->...qd', unnormalised.astype(v.dtype), v)
  return (out.astype(jnp.float32) / row_sum).astype(v.dtype), row_max + jnp.log(row_sum)


def attention_grads(q, k, v, out, logsumexp, grad, scale):
  """(dq, dk, dv) of softmax attention from its inputs, output and row log-sum-exp: the
  probabilities are recomputed, as flash attention does, instead of kept from the forward pass.
  Float32 results; the matmuls take the inputs' dtype and accumulate in float32."""
  f32 = jnp.float32
  # The (q, k) tensors in the inputs' dtype, as the forward pass's: widened only inside fusions.
  probs = jnp.exp(attention_scores(q, k, scale) - logsumexp).astype(grad.dtype)
  dv = jnp.einsum('...qk,...qd->...kd', probs, grad, preferred_element_type=f32)
  d_probs = jnp.einsum('...qd,...kd->...qk', grad, v).astype(f32)
  row_dot = jnp.sum(grad.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  d_scores = (probs.astype(f32) * (d_probs - row_dot) * scale).astype(q.dtype)
  dq = jnp.einsum('...qk,...kd->...qd', d_scores, k, preferred_element_type=f32)
  dk = jnp.einsum('...qk,...qd->...kd', d_scores, q, preferred_element_type=f32)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recompute_attention(q, k, v, scale):
  """`deferred_attention`'s output, with a backward pass that keeps only q, k, v, the output and
  the row log-sum-exp: no (q, k)-sized tensor stays in memory between the passes."""
  return deferred_attention(q, k, v, scale)[0]


def _recompute_attention_fwd(q, k, v, scale):
  out, logsumexp = deferred_attention(q, k, v, scale)
  return out, (q, k, v, out, logsumexp)


def _recompute_attention_bwd(scale, residuals, grad):
  q, k, v, _, _ = residuals
  dq, dk, dv = attention_grads(*residuals, grad, scale)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


recompute_attention.defvjp(_recompute_attention_fwd, _recompute_attention_bwd)


# ----------------------------------------------------------------------------------------------------
# Average pooling as torch.nn.AvgPool2d(ceil_mode=True, count_include_pad=True).

def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a convolution along an axis of length n (explicit symmetric padding)."""
  return (n + 2 * padding - kernel) // stride + 1


def stage_sizes(cfg, height: int, width: int) -> list[tuple[int, int, int, int]]:
  """Per stage of a CvTConfig for height x width images: (h, w) of its token map after the
  convolutional embedding, and the spatial query and key/value token counts of its attention
  (the cls token not counted): 'dw_bn' strided convolutions, 'avg' keys and values pooled in ceil
  mode with queries unprojected, 'linear' no projection."""
  sizes, h, w = [], height, width
  for i in range(cfg.num_stages):
    embed = (cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i])
    h, w = conv_output_size(h, *embed), conv_output_size(w, *embed)
    q_args = (cfg.kernel_qkv[i], cfg.stride_q[i], cfg.padding_q[i])
    kv_args = (cfg.kernel_qkv[i], cfg.stride_kv[i], cfg.padding_kv[i])
    method = cfg.qkv_proj_method[i]
    if method == 'dw_bn':
      queries = conv_output_size(h, *q_args) * conv_output_size(w, *q_args)
      keys = conv_output_size(h, *kv_args) * conv_output_size(w, *kv_args)
    elif method == 'avg':
      queries = h * w
      keys = ceil_pool_output_size(h, *kv_args) * ceil_pool_output_size(w, *kv_args)
    else:
      queries = keys = h * w
    sizes.append((h, w, queries, keys))
  return sizes


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


def even_length_attention(q, k, v, scale, implementation):
  """`jax.nn.dot_product_attention` of (b, tokens, heads, d) q, k, v, with an odd number of
  queries or keys (a cls token's stage: 197 and 50 at 224 px) padded by one: jax's cuDNN
  attention refuses odd lengths in training ('Unsupported sequence length'). The padded key is
  masked out (`key_value_seq_lengths`, cuDNN's padding mask), the padded query's output dropped,
  so the result and the gradients are the unpadded attention's."""
  queries, keys = q.shape[1], k.shape[1]
  pad = lambda t: jnp.pad(t, ((0, 0), (0, t.shape[1] % 2), (0, 0), (0, 0)))
  lengths = None if keys % 2 == 0 else jnp.full((q.shape[0],), keys, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :queries]
