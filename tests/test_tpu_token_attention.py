"""The TPU backend's attention on the model's token layout (`cvt_flax/models/tpu/token_attention.py`), checked
without a TPU: its numerics in Pallas's TPU interpreter on this CPU (whole and blocked queries,
float32 and bfloat16), its declared costs against the formulas, and its Mosaic compile for a TPU
(libtpu, deviceless), where XLA must count the kernels; and a training model on them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models import layers, with_compute
from cvt_flax.models.tpu import token_attention
from cvt_flax.runtime import compiler
from helpers import MOSAIC_SLICES, assert_same_gradients

# (batch, queries, keys, channels, heads) at CvT-13's three stages, per chip.
STAGES = [(8, 3136, 784, 64, 1), (8, 784, 196, 192, 3), (8, 197, 50, 384, 6)]


def _inputs(b, nq, nk, c, seed=0):
  rng = np.random.default_rng(seed)
  q, grad = (rng.normal(size=(b, nq, c)).astype(np.float32) for _ in range(2))
  k, v = (rng.normal(size=(b, nk, c)).astype(np.float32) for _ in range(2))
  return q, k, v, grad


def _split(t, heads):
  b, n, c = t.shape
  return t.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def _merge(t):
  b, h, n, d = t.shape
  return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _exact(q, k, v, grad, heads, scale):
  """The output and the three input gradients in float64 (NumPy), on the token layout."""
  q, k, v, grad = (_split(np.asarray(t, np.float64), heads) for t in (q, k, v, grad))
  scores = np.einsum('bhqd,bhkd->bhqk', q, k) * scale
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = probs @ v
  d_scores = probs * (grad @ np.swapaxes(v, -1, -2) - (grad * out).sum(-1, keepdims=True)) * scale
  return [_merge(t) for t in (out, d_scores @ k, np.einsum('bhqk,bhqd->bhkd', d_scores, q),
                              np.einsum('bhqk,bhqd->bhkd', probs, grad))]


def _output_and_grads(attention, q, k, v, grad):
  out, vjp = jax.vjp(attention, q, k, v)
  return [np.asarray(t, np.float64) for t in (out, *vjp(grad))]


def _kernels(heads, scale):
  return lambda q, k, v: token_attention.token_attention(q, k, v, heads, scale, True)


def _xla(heads, scale):
  """XLA's attention of the same inputs (the model's 'recompute' path, heads split out)."""
  return lambda q, k, v: _merge(layers.recompute_attention(
      *(_split(t, heads) for t in (q, k, v)), scale))


def _max_errors(got, want):
  return [np.abs(g - w).max() for g, w in zip(got, want)]


# CvT-13's last stage (all queries in one block, 6 heads of 64 lanes); a blocked call: three
# images of 300 queries in blocks of 64 (the last one runs past the end) against 40 keys, 2 heads.
@pytest.mark.parametrize('shape, budget', [((2, 197, 50, 384, 6), None),
                                           ((3, 300, 40, 128, 2), 800_000)])
def test_attention_and_its_gradients_are_exact_to_float32_rounding(shape, budget, monkeypatch):
  b, nq, nk, c, heads = shape
  if budget:
    monkeypatch.setattr(token_attention, 'VMEM_BUDGET', budget)
    assert token_attention.plan(b, nq, nk, c, 4) == (1, 64)
  q, k, v, grad = _inputs(b, nq, nk, c)
  scale = c ** -0.5
  exact = _exact(q, k, v, grad, heads, scale)
  kernels = _output_and_grads(_kernels(heads, scale), q, k, v, grad)
  # The noise floor, measured here: XLA's float32 attention against the same exact answer.
  floors = _max_errors(_output_and_grads(_xla(heads, scale), q, k, v, grad), exact)
  for name, error, floor, got in zip(('out', 'dq', 'dk', 'dv'), _max_errors(kernels, exact),
                                     floors, kernels):
    assert error <= 4 * floor, name
    assert np.isfinite(got).all(), name


def test_in_bfloat16_the_kernels_err_no_more_than_xla():
  b, nq, nk, c, heads = 2, 197, 50, 384, 6
  q, k, v, grad = (jnp.asarray(t, jnp.bfloat16) for t in _inputs(b, nq, nk, c, seed=1))
  scale = c ** -0.5
  exact = _exact(q, k, v, grad, heads, scale)
  kernels = _max_errors(_output_and_grads(_kernels(heads, scale), q, k, v, grad), exact)
  xla = _max_errors(_output_and_grads(_xla(heads, scale), q, k, v, grad), exact)
  for name, error, floor in zip(('out', 'dq', 'dk', 'dv'), kernels, xla):
    assert error <= 2 * floor, name


def _estimates(b, nq, nk, c, heads, dtype=jnp.bfloat16):
  q = jax.ShapeDtypeStruct((b, nq, c), dtype)
  k = jax.ShapeDtypeStruct((b, nk, c), dtype)
  blocks = -(-nq // token_attention.plan(b, nq, nk, c, 2)[1])
  return (token_attention.forward_cost(q, k, k, q, heads, blocks),
          token_attention.backward_cost(q, k, k, q, q, k, k, heads, blocks))


@pytest.mark.parametrize('shape', STAGES)
def test_both_kernels_declare_their_matmuls_and_the_bytes_they_read_and_write(shape):
  b, nq, nk, c, heads = shape
  forward, backward = _estimates(*shape)
  products = b * nq * nk * c  # per head: queries x keys x head width, summed over the heads
  assert forward.flops == 2 * 2 * products and backward.flops == 5 * 2 * products
  assert forward.transcendentals == backward.transcendentals == b * heads * nq * nk
  query_side, key_side = b * nq * c * 2, b * nk * c * 2  # one bf16 array of each
  assert forward.bytes_accessed >= 2 * query_side + 2 * key_side  # q, out; k, v
  assert backward.bytes_accessed >= 3 * query_side + 4 * key_side  # q, grad, dq; k, v, dk, dv


@pytest.fixture(scope='module', params=MOSAIC_SLICES)
def tpu_device(request):
  return aot_compile.slice_devices(tpus.parse_slice(request.param))[0]


# CvT-13's stages, its last at 256 images per chip, and CvT-W24's last stage at 384 px (16 heads,
# 32 images per chip: the microbatch of its recipe with accumulation), the widest blocks.
@pytest.mark.parametrize('shape', STAGES + [(256, 197, 50, 384, 6), (32, 577, 145, 1024, 16)])
def test_mosaic_compiles_every_stage_shape_and_xla_counts_the_kernels(shape, tpu_device):
  b, nq, nk, c, heads = shape
  sharding = jax.sharding.SingleDeviceSharding(tpu_device)
  q = jax.ShapeDtypeStruct((b, nq, c), jnp.bfloat16, sharding=sharding)
  k = jax.ShapeDtypeStruct((b, nk, c), jnp.bfloat16, sharding=sharding)
  def forward_and_backward(q, k, v, grad):
    out, vjp = jax.vjp(lambda q, k, v: token_attention.token_attention(q, k, v, heads, c ** -0.5), q, k, v)
    return out, vjp(grad)

  step = jax.jit(forward_and_backward)
  cost = compiler.cost_analysis(step.lower(q, k, k, q).compile())
  declared = _estimates(*shape)
  # The step's FLOPs are the kernels' (nothing else multiplies), and its bytes include theirs.
  assert cost['flops'] >= sum(c.flops for c in declared)
  assert cost['bytes accessed'] >= sum(c.bytes_accessed for c in declared)


def test_a_training_model_on_the_kernels_takes_the_same_steps(monkeypatch):
  """The loss and every parameter gradient equal XLA's path, with a cls-token stage (a 9 x 7
  map: 1 + 63 queries against 1 + 20 keys)."""
  kernel, calls = token_attention.token_attention, []

  def interpreted(q, k, *args):
    calls.append((q.shape, k.shape))
    return kernel(q, k, *args, interpret=True)
  monkeypatch.setattr(token_attention, 'token_attention', interpreted)
  model = cvt_flax.create_model('tiny', num_classes=10, rngs=nnx.Rngs(3))  # cls token last
  on_kernels = with_compute(model, attention_impl='flash')
  images = np.random.default_rng(4).normal(size=(3, 36, 28, 3)).astype(np.float32)
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  want_loss, want = nnx.value_and_grad(loss)(model, images)
  got_loss, got = nnx.value_and_grad(loss)(on_kernels, images)
  assert calls == [((3, 252, 16), (3, 63, 16)), ((3, 64, 32), (3, 21, 32))]
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  assert_same_gradients(want, got)
