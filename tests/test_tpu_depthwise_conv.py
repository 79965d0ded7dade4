"""The TPU backend's depthwise convolutions of a block's three projections
(`cvt_flax/models/tpu/depthwise_conv.py`), checked without a TPU: their numerics in Pallas's TPU
interpreter on this CPU (one device and a batch split over four, and in a training model), their
declared costs against the formulas, and their Mosaic compile for a TPU (libtpu, deviceless)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models import layers, with_compute
from cvt_flax.models.tpu import depthwise_conv, depthwise_conv_whole, sharded
from cvt_flax.runtime import compiler
from helpers import MOSAIC_SLICES, assert_same_gradients, on_one_and_four_cpu_devices

STRIDES = (1, 2, 2)  # q, k, v in every CvT variant


def _inputs(shape, seed=0):
  """A token map, the three kernels (taps in rows) and a gradient for each output."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  w = (rng.normal(size=(len(STRIDES), 9, shape[-1])) / 3).astype(np.float32)
  b, h, width, c = shape
  grads = [rng.normal(size=(b, depthwise_conv.out_size(h, s), depthwise_conv.out_size(width, s), c))
           .astype(np.float32) for s in STRIDES]
  return x, w, grads


def _exact(x, w, grads):
  """The outputs and the gradients of x and w, in float64 (NumPy, padded windows)."""
  x, w = np.float64(x), np.float64(w)
  b, h, width, c = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  outs, dx_padded, dw = [], np.zeros_like(padded), np.zeros_like(w)
  for conv, (stride, grad) in enumerate(zip(STRIDES, grads)):
    ho, wo = depthwise_conv.out_size(h, stride), depthwise_conv.out_size(width, stride)
    out = np.zeros((b, ho, wo, c))
    for a in range(3):
      for col in range(3):
        rows, cols = slice(a, a + stride * (ho - 1) + 1, stride), slice(
            col, col + stride * (wo - 1) + 1, stride)
        window = padded[:, rows, cols]
        out += window * w[conv, 3 * a + col]
        dw[conv, 3 * a + col] = np.sum(window * grad, axis=(0, 1, 2))
        dx_padded[:, rows, cols] += grad * w[conv, 3 * a + col]
    outs.append(out)
  return outs + [dx_padded[:, 1:-1, 1:-1], dw]


def _xla(x, w):
  return [layers.depthwise_conv_xla(x, w[i].reshape(3, 3, 1, -1), s, 1)
          for i, s in enumerate(STRIDES)]


def _kernels(mesh=None):
  """The kernels, interpreted; on `mesh` one call per shard of the batch, as the model runs them."""
  kernels = lambda x, w: depthwise_conv.depthwise_convs(x, w, STRIDES, interpret=True)
  return lambda x, w: sharded.on_batch_shards(mesh, kernels, (x, w), split_in=1)


def _outputs_and_grads(fn, x, w, grads):
  outs, vjp = jax.vjp(fn, x, w)
  return list(outs) + list(vjp([g.astype(o.dtype) for g, o in zip(grads, outs)]))


WHAT = ('q', 'k', 'v', 'dx', 'dw')


@pytest.mark.parametrize('shape', [(2, 14, 14, 24), (1, 7, 9, 8), (3, 8, 6, 16)])
def test_the_convolutions_and_their_gradients_are_exact_to_float32_rounding(shape):
  """Square, odd and non-square maps (cls-token stages and any input size)."""
  x, w, grads = _inputs(shape)
  exact = _exact(x, w, grads)
  got = _outputs_and_grads(_kernels(), x, w, grads)
  xla = _outputs_and_grads(_xla, x, w, grads)
  for what, g, noise, want in zip(WHAT, got, xla, exact):
    # XLA's float32 convolution against float64 is the noise floor (measured 2e-7 relative).
    floor = np.abs(np.asarray(noise) - want).max()
    assert np.abs(np.asarray(g) - want).max() <= 4 * floor, what


def test_in_bfloat16_the_convolutions_are_as_close_to_exact_as_xla():
  x, w, grads = _inputs((2, 14, 14, 32), seed=1)
  rounded = np.float32(jnp.asarray(w, jnp.bfloat16))  # the model rounds the kernels so
  exact = _exact(np.float32(jnp.asarray(x, jnp.bfloat16)), rounded, grads)
  xb = jnp.asarray(x, jnp.bfloat16)
  got = _outputs_and_grads(_kernels(), xb, jnp.asarray(rounded), grads)
  xla = _outputs_and_grads(lambda x, w: _xla(x, w.astype(jnp.bfloat16)), xb,
                           jnp.asarray(rounded), grads)
  for what, g, ref, want in zip(WHAT, got, xla, exact):
    error = lambda a: np.abs(np.float64(np.asarray(a, np.float32)) - want).max()
    assert error(g) <= 2 * error(ref), what


@pytest.mark.parametrize('shape', [(256, 56, 56, 64), (256, 28, 28, 192), (256, 14, 14, 384)])
def test_each_kernel_declares_its_arithmetic_and_at_least_the_bytes_it_reads_and_writes(shape):
  b, h, width, c = shape
  x = jax.ShapeDtypeStruct((h, width, b, c), jnp.bfloat16)  # the kernels' layout
  w = jax.ShapeDtypeStruct((3, 9, 1, c), jnp.float32)
  outs = depthwise_conv_whole._out_shapes(x, STRIDES)
  forward = depthwise_conv_whole.forward_cost(x, w, outs)
  backward = depthwise_conv_whole.backward_cost(x, w, outs, x, w)
  image, small = h * width * c * 2, (h // 2) * (width // 2) * c * 2  # bf16 maps
  assert forward.bytes_accessed >= b * (2 * image + 2 * small)  # x; q, k, v
  assert backward.bytes_accessed >= b * (3 * image + 2 * small)  # x, dq, dx; dk, dv
  taps = 2 * 9 * b * c  # a multiply-add per tap, channel and image
  assert forward.flops >= taps * (h * width + 2 * (h // 2) * (width // 2))
  assert backward.flops >= 2 * taps * (h * width + 2 * (h // 2) * (width // 2))  # dx and dw


@pytest.mark.parametrize('slice_name', MOSAIC_SLICES)
@pytest.mark.parametrize('b', [8, 256])
def test_mosaic_compiles_cvt13_last_stage_and_xla_counts_the_kernels(b, slice_name):
  device = aot_compile.slice_devices(tpus.parse_slice(slice_name))[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  h, c = 14, 384
  assert depthwise_conv.fits(b, h, h, c)
  x = jax.ShapeDtypeStruct((b, h, h, c), jnp.bfloat16, sharding=placed)
  w = jax.ShapeDtypeStruct((3, 9, c), jnp.float32, sharding=placed)
  grads = [jax.ShapeDtypeStruct((b, depthwise_conv.out_size(h, s), depthwise_conv.out_size(h, s), c),
                                jnp.bfloat16, sharding=placed) for s in STRIDES]
  step = jax.jit(lambda x, w, g: jax.vjp(
      lambda x, w: depthwise_conv.depthwise_convs(x, w, STRIDES), x, w)[1](g))
  cost = compiler.cost_analysis(step.lower(x, w, grads).compile())
  assert cost['bytes accessed'] >= b * h * h * c * 2 * 3  # x, dq, dx at least
  assert cost['flops'] >= 2 * 9 * b * h * h * c * 2  # the backward kernel's dx and dw


def test_larger_maps_and_other_kernels_take_xlas_convolutions():
  # At 256 images per chip, CvT-13's first two stages at 384 px (96 and 48 px maps) fit neither
  # whole nor in blocks of rows (`depthwise_conv_rows`); nor does an odd-sided map too large whole.
  assert not depthwise_conv.fits(256, 96, 96, 64) and not depthwise_conv.fits(256, 48, 48, 192)
  assert not depthwise_conv.fits(256, 57, 57, 64)
  assert not depthwise_conv.supported(3, (1, 2, 2), (0, 0, 0)) and not depthwise_conv.supported(5, (1,), (2,))


_FOUR_DEVICES = r'''
import json
import jax, numpy as np
from test_tpu_depthwise_conv import _inputs, _kernels, _outputs_and_grads
x, w, grads = _inputs((4, 6, 6, 8))
def run(mesh):
  args = (x, w, grads)
  if mesh is not None:  # the batch split over the devices, the kernels on every one
    split, whole = (jax.NamedSharding(mesh, jax.P(*s)) for s in (('data',), ()))
    args = (jax.device_put(x, split), jax.device_put(w, whole), jax.device_put(grads, split))
  fn = _kernels(mesh)
  return [np.asarray(a).tolist() for a in jax.jit(lambda *a: _outputs_and_grads(fn, *a))(*args)]
print('RESULT' + json.dumps({'one': run(None), 'four': run(jax.make_mesh((4,), ('data',)))}))
'''


def test_on_four_devices_the_weight_gradients_are_summed_over_the_batch():
  one_device, four_devices = on_one_and_four_cpu_devices(_FOUR_DEVICES)
  for what, one, four in zip(WHAT, one_device, four_devices):
    # Float32 reordering of the sum over images only; a missing sum would leave a quarter.
    np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-6, err_msg=what)


def assert_training_step_matches_xla():
  """One training step of the tiny model (a cls-token last stage, 36 x 28 px images) on XLA's
  path and on the kernels: the loss, every parameter gradient (float32 reordering, as for the
  block kernel) and the BatchNorms' running statistics equal. Returns (XLA's model, the kernels'
  model, the images)."""
  model = cvt_flax.create_model('tiny', num_classes=10, rngs=nnx.Rngs(3))
  fused = with_compute(cvt_flax.create_model('tiny', num_classes=10, rngs=nnx.Rngs(3)),
                       dwconv_impl='fused')
  images = np.random.default_rng(4).normal(size=(3, 36, 28, 3)).astype(np.float32)
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  want_loss, want = nnx.value_and_grad(loss)(model, images)
  got_loss, got = nnx.value_and_grad(loss)(fused, images)
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  assert_same_gradients(want, got)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)),
                               nnx.to_flat_state(nnx.state(fused, nnx.BatchStat))):
    np.testing.assert_allclose(b.get_value(), a.get_value(), rtol=1e-5, atol=1e-6,
                               err_msg=str(path))
  return model, fused, images


def test_a_training_model_on_the_kernels_takes_the_same_steps(monkeypatch):
  """Training mode (the BatchNorms inside the kernels): the loss, every parameter gradient and
  the BatchNorms' running statistics equal XLA's path, with a cls-token stage and an odd-sized
  map. In eval mode the kernels compute the convolutions alone."""
  calls = {'depthwise_convs': [], 'depthwise_convs_batch_norm': []}
  for name in calls:
    def interpreted(x, *args, name=name, kernel=getattr(depthwise_conv, name)):
      calls[name].append(x.shape)
      return kernel(x, *args, interpret=True)
    monkeypatch.setattr(depthwise_conv, name, interpreted)
  model, fused, images = assert_training_step_matches_xla()
  # 36x28 px, patches of stride 2, then 2
  assert calls == {'depthwise_convs': [], 'depthwise_convs_batch_norm': [(3, 18, 14, 16),
                                                                        (3, 9, 7, 32)]}
  model.eval()
  fused.eval()
  np.testing.assert_allclose(fused(images), model(images), rtol=1e-5, atol=1e-5)
  assert [len(c) for c in calls.values()] == [2, 2]
