"""The TPU backend's fused second half of a block, `x + drop_path(mlp(layer_norm(x)))`
(`cvt_flax/models/tpu/mlp_residual.py`), checked without a TPU: its numerics in Pallas's TPU interpreter on
this CPU (one device and a batch split over four), its declared costs against the formulas, and its
Mosaic compile for a TPU (libtpu, deviceless)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

import cvt_flax
from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models import layers, norms, with_compute
from cvt_flax.models.tpu import mlp_residual, sharded
from cvt_flax.runtime import compiler
from helpers import MOSAIC_SLICES, assert_same_gradients, on_one_and_four_cpu_devices

ACTIVATIONS = {'quick_gelu': layers.quick_gelu, 'gelu': layers.exact_gelu}


GRADS = ('dx', 'd_norm_scale', 'd_norm_bias', 'dw1', 'db1', 'dw2', 'db2')


def _inputs(b, n, width, seed=0):
  """Tokens, stochastic depth's per-image scale (one image dropped, one scaled), the LayerNorm's
  and the MLP's parameters, and an output gradient."""
  rng = np.random.default_rng(seed)
  hidden = 4 * width
  x, grad = (rng.normal(size=(b, n, width)).astype(np.float32) for _ in range(2))
  scale = np.resize(np.float32([0.0, 1.25, 1.0]), b)
  params = [(rng.normal(size=shape) * 0.1 + offset).astype(np.float32)
            for shape, offset in (((width,), 1), ((width,), 0), ((width, hidden), 0),
                                  ((hidden,), 0), ((hidden, width), 0), ((width,), 0))]
  return x, scale, params, grad


def _exact(x, scale, params, grad, name, epsilon=1e-5):
  """The output and the gradients in float64 (NumPy)."""
  x, grad = np.float64(x), np.float64(grad)
  norm_scale, norm_bias, w1, b1, w2, b2 = (np.float64(p) for p in params)
  centred = x - x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + epsilon)
  normalised = centred * rstd
  normed = normalised * norm_scale + norm_bias
  pre = normed @ w1 + b1
  if name == 'quick_gelu':
    sig = 1 / (1 + np.exp(-1.702 * pre))
    act, slope = pre * sig, sig + 1.702 * pre * sig * (1 - sig)
  else:
    act = 0.5 * pre * (1 + erf(pre / np.sqrt(2)))
    slope = 0.5 * (1 + erf(pre / np.sqrt(2))) + pre * np.exp(-pre ** 2 / 2) / np.sqrt(2 * np.pi)
  per_image = np.float64(scale)[:, None, None]
  out = x + per_image * (act @ w2 + b2)
  d_branch = grad * per_image
  d_pre = (d_branch @ w2.T) * slope
  d_normed = d_pre @ w1.T
  d_normalised = d_normed * norm_scale
  dx = grad + rstd * (d_normalised - d_normalised.mean(-1, keepdims=True)
                      - normalised * (d_normalised * normalised).mean(-1, keepdims=True))
  rows = lambda a: a.reshape(-1, a.shape[-1])
  return (out, dx, rows(d_normed * normalised).sum(0), rows(d_normed).sum(0),
          rows(normed).T @ rows(d_pre), rows(d_pre).sum(0), rows(act).T @ rows(d_branch),
          rows(d_branch).sum(0))


def _output_and_grads(fn, x, params, grad):
  out, vjp = jax.vjp(fn, x, *params)
  return (out, *vjp(jnp.asarray(grad, out.dtype)))


def _xla(name, scale, dtype=jnp.float32):
  """The model's own path: LayerNorm, the MLP in `dtype` (weights cast as nnx.Linear casts them),
  stochastic depth, the residual add."""
  def block(x, norm_scale, norm_bias, *weights):
    y = norms.layer_norm(x, norm_scale, norm_bias, 1e-5, dtype)
    w1, b1, w2, b2 = (w.astype(dtype) for w in weights)
    return x + jnp.asarray(scale, dtype)[:, None, None] * (ACTIVATIONS[name](y @ w1 + b1) @ w2 + b2)
  return block


def _fused(name, scale, mesh=None):
  """The fused block, interpreted; on `mesh` one call per shard of the batch, as the model runs it."""
  block = lambda *args: mlp_residual.fused_mlp_block(*args, ACTIVATIONS[name], 1e-5, True)
  return lambda x, *params: sharded.on_batch_shards(mesh, block, (x, jnp.asarray(scale), *params),
                                                    split_in=2)


# (batch, tokens, width): the cls-token stage (197 tokens, one block of 200 rows: padded), and
# tokens over several blocks (600 = 2 x 304, the last block partial).
@pytest.mark.parametrize('shape', [(3, 197, 32), (1, 600, 16)])
@pytest.mark.parametrize('name', sorted(ACTIVATIONS))
def test_fused_block_and_its_gradients_are_exact_to_float32_rounding(shape, name):
  x, scale, params, grad = _inputs(*shape)
  exact = _exact(x, scale, params, grad, name)
  fused = _output_and_grads(_fused(name, scale), x, params, grad)
  # The noise floor, measured here: the model's float32 XLA path against the same exact answer.
  xla = _output_and_grads(_xla(name, scale), x, params, grad)
  for what, got, noise, want in zip(('out',) + GRADS, fused, xla, exact):
    floor = np.abs(np.asarray(noise) - want).max()
    assert np.abs(np.asarray(got) - want).max() <= 4 * floor, what
    assert np.isfinite(np.asarray(got)).all(), what


def test_in_bfloat16_the_fused_block_is_as_close_to_exact_as_xla():
  x, scale, params, grad = _inputs(2, 197, 64, seed=1)
  exact = _exact(x, scale, params, grad, 'quick_gelu')
  x16 = jnp.asarray(x, jnp.bfloat16)
  fused = _output_and_grads(_fused('quick_gelu', scale), x16, params, grad)
  xla = _output_and_grads(_xla('quick_gelu', scale, jnp.bfloat16), x16, params, grad)
  for what, got, noise, want in zip(('out',) + GRADS, fused, xla, exact):
    error = lambda a: np.abs(np.asarray(a, np.float64) - want).max() / np.abs(want).max()
    assert error(got) <= 2 * error(noise), what


def _params(width, dtype, **placed):
  """The kernels' parameter operands: LayerNorm and bias rows (float32), matrices in `dtype`."""
  hidden = 4 * width
  row = lambda size: jax.ShapeDtypeStruct((1, size), jnp.float32, **placed)
  matrix = lambda shape: jax.ShapeDtypeStruct(shape, dtype, **placed)
  return row(width), row(width), matrix((width, hidden)), row(hidden), matrix((hidden, width)), row(
      width)


@pytest.mark.parametrize('shape', [(256, 3136, 64), (256, 784, 192), (256, 197, 384)])
def test_each_kernel_declares_its_matmuls_and_at_least_the_bytes_it_reads_and_writes(shape):
  b, n, width = shape
  hidden = 4 * width
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((b,), jnp.float32)
  params = _params(width, jnp.bfloat16)
  grads = [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params]
  forward = mlp_residual.forward_cost(x, scale, *params, x)
  backward = mlp_residual.backward_cost(x, x, scale, *params[:-1], x, *grads)
  rows = b * -(-n // mlp_residual.block_rows(n)) * mlp_residual.block_rows(n)  # whole blocks, padding included
  assert rows >= b * n
  assert forward.flops == 2 * 2 * rows * width * hidden  # fc1, fc2
  assert backward.flops == 5 * 2 * rows * width * hidden  # fc1 again, dw2, d hidden, dw1, dx
  # The activation per hidden unit, one reciprocal square root per row (the LayerNorm).
  assert forward.transcendentals == backward.transcendentals == rows * (hidden + 1)
  tokens, weights = b * n * width * 2, 2 * width * hidden * 2  # one bf16 (b, n, width) array
  assert forward.bytes_accessed >= 2 * tokens + weights  # x, out; w1, w2
  assert backward.bytes_accessed >= 3 * tokens + weights + 2 * weights  # x, grad, dx; float32 dw


@pytest.mark.parametrize('slice_name', MOSAIC_SLICES)
def test_mosaic_compiles_every_cvt13_stage_and_xla_counts_the_kernels(slice_name):
  device = aot_compile.slice_devices(tpus.parse_slice(slice_name))[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  for b, n, width in [(8, 3136, 64), (8, 784, 192), (8, 197, 384)]:
    assert mlp_residual.fits(n, width, 4 * width, 2)
    # float32 in, and the bfloat16 results into a matmul as the next block's would: the kernels'
    # operands and results are laid out as XLA chooses inside a step (TPU7x: (16, 128) tiles).
    x = jax.ShapeDtypeStruct((b, n, width), jnp.float32, sharding=placed)
    scale = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=placed)
    params = [jax.ShapeDtypeStruct(p.shape[-1:] if p.shape[0] == 1 else p.shape, jnp.float32,
                                   sharding=placed) for p in _params(width, jnp.float32)]

    def sums(x, s, p, g):
      outs = _output_and_grads(
          lambda x, *p: mlp_residual.fused_mlp_block(x, s, *p, layers.quick_gelu, 1e-5),
          x.astype(jnp.bfloat16), p, g.astype(jnp.bfloat16))
      return [jnp.sum(o @ jnp.ones((o.shape[-1], 128), o.dtype), dtype=jnp.float32)
              for o in outs if o.dtype == jnp.bfloat16]
    compiled = jax.jit(sums).lower(x, scale, params, x).compile()
    cost = compiler.cost_analysis(compiled)
    # The kernels' FLOPs are the step's (nothing else multiplies), and its bytes include theirs.
    assert cost['flops'] >= 14 * b * n * width * 4 * width
    assert cost['bytes accessed'] >= 5 * b * n * width * 2
  assert not mlp_residual.fits(577, 1024, 4096, 2)  # CvT-W24's last stage takes XLA's path


def test_training_with_stochastic_depth_takes_the_same_steps_on_the_kernel(monkeypatch):
  """In training mode, with stochastic depth dropping images, the model on the kernel draws the
  same masks and gives the same outputs and parameter gradients as on XLA's path."""
  kernel, scales = mlp_residual.fused_mlp_block, []

  def interpreted(x, scale, *args):
    scales.append(scale)
    return kernel(x, scale, *args, interpret=True)
  monkeypatch.setattr(mlp_residual, 'fused_mlp_block', interpreted)
  # Stochastic depth grows from 0 over a stage's blocks: the second block of stage 2 drops images
  # with probability 0.6.
  model = cvt_flax.create_model(dict(variant='tiny', depth=(1, 2), drop_path_rate=(0.0, 0.6)),
                                num_classes=10, rngs=nnx.Rngs(3))
  fused = with_compute(model, mlp_impl='fused')  # same weights and random state, not yet used
  images = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype(np.float32)
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  want_loss, want = nnx.value_and_grad(loss)(model, images)
  got_loss, got = nnx.value_and_grad(loss)(fused, images)
  assert any(float(jnp.min(scale)) == 0 for scale in scales)  # an image was dropped
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  assert_same_gradients(want, got)  # float32 reordering: measured <= 2e-7 of the largest


_FOUR_DEVICES = r'''
import json
import jax, numpy as np
from test_tpu_mlp_residual import _fused, _inputs, _output_and_grads
x, scale, params, grad = _inputs(4, 197, 16)
def run(mesh):
  args = (x, params, grad)
  if mesh is not None:  # the batch split over the devices, the parameters on every one
    split, whole = (jax.NamedSharding(mesh, jax.P(*s)) for s in (('data',), ()))
    args = (jax.device_put(x, split), jax.device_put(params, whole), jax.device_put(grad, split))
  fn = _fused('quick_gelu', scale if mesh is None else jax.device_put(scale, split), mesh)
  return [np.asarray(a).tolist() for a in jax.jit(lambda *a: _output_and_grads(fn, *a))(*args)]
print('RESULT' + json.dumps({'one': run(None), 'four': run(jax.make_mesh((4,), ('data',)))}))
'''


def test_on_four_devices_the_parameter_gradients_are_summed_over_the_batch():
  one_device, four_devices = on_one_and_four_cpu_devices(_FOUR_DEVICES)
  for what, one, four in zip(('out',) + GRADS, one_device, four_devices):
    # Each device sums a quarter of the batch, then the four are added: float32 reordering only
    # (measured: bitwise equal on this CPU). A missing sum would leave a quarter of each.
    np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-6, err_msg=what)


@pytest.mark.slow  # the interpreter at CvT-13's real stage shapes: ~6 s each on 2 cores
@pytest.mark.parametrize('shape', [(2, 3136, 64), (2, 785, 192), (2, 197, 384)])
def test_at_cvt13_stage_shapes_the_fused_block_is_exact_to_float32_rounding(shape):
  x, scale, params, grad = _inputs(*shape, seed=2)
  exact = _exact(x, scale, params, grad, 'quick_gelu')
  fused = _output_and_grads(_fused('quick_gelu', scale), x, params, grad)
  xla = _output_and_grads(_xla('quick_gelu', scale), x, params, grad)
  for what, got, noise, want in zip(('out',) + GRADS, fused, xla, exact):
    floor = np.abs(np.asarray(noise) - want).max()
    assert np.abs(np.asarray(got) - want).max() <= 4 * floor, what
