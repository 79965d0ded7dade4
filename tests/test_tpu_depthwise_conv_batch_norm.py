"""The TPU backend's depthwise convolutions with their training-mode BatchNorms inside the kernels
(`cvt_flax/models/tpu/depthwise_conv.py`, `depthwise_convs_batch_norm`), checked without a TPU: numerics
against float64 in Pallas's TPU interpreter (one device and a batch split over four, where the
statistics must be the whole batch's), the declared costs, and the Mosaic compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models import layers, norms
from cvt_flax.models.tpu import depthwise_conv, depthwise_conv_whole, sharded
from cvt_flax.runtime import compiler
from helpers import MOSAIC_SLICES, on_one_and_four_cpu_devices
from test_tpu_depthwise_conv import STRIDES, _exact, _inputs

EPSILON = 1e-5
WHAT = ('q', 'k', 'v', 'means', 'variances', 'dx', 'dw', 'd_scale', 'd_bias')


def _bn_inputs(shape, offset, seed=0):
  """The map (its mean `offset`), the kernels, BatchNorm parameters, each output's gradient and
  gradients for the statistics."""
  x, w, grads = _inputs(shape, seed)
  rng = np.random.default_rng(seed + 1)
  scale, bias, d_mean, d_var = (rng.normal(size=(3, shape[-1])).astype(np.float32)
                                for _ in range(4))
  return x + np.float32(offset), w, scale, bias, grads, d_mean, d_var


def _exact_bn(x, w, scale, bias, grads, d_mean, d_var):
  """Everything in float64 (NumPy): the convolutions, BatchNorm over the batch, both backward."""
  outs = _exact(x, w, [np.zeros_like(g) for g in grads])[:3]
  ys, means, variances, conv_grads, d_scale, d_bias = [], [], [], [], [], []
  for conv, (out, grad) in enumerate(zip(outs, grads)):
    grad, axes, count = np.float64(grad), (0, 1, 2), np.prod(out.shape[:3])
    mean, var = out.mean(axes), out.var(axes)
    rstd = 1 / np.sqrt(var + EPSILON)
    xhat = (out - mean) * rstd
    ys.append(xhat * scale[conv] + bias[conv])
    means.append(mean)
    variances.append(var)
    d_bias.append(grad.sum(axes))
    d_scale.append((grad * xhat).sum(axes))
    conv_grads.append(scale[conv] * rstd * (grad - d_bias[-1] / count - xhat * d_scale[-1] / count)
                      + d_mean[conv] / count + d_var[conv] * 2 * (out - mean) / count)
  dx, dw = _exact(x, w, conv_grads)[3:]
  return ys + [np.stack(means), np.stack(variances), dx, dw, np.stack(d_scale), np.stack(d_bias)]


def _xla(x, w, scale, bias):
  """The model's XLA path: each convolution, then `norms.batch_norm`."""
  results = [norms.batch_norm(layers.depthwise_conv_xla(x, w[i].reshape(3, 3, 1, -1), s, 1),
                              scale[i], bias[i], EPSILON, x.dtype)
             for i, s in enumerate(STRIDES)]
  return ([r[0] for r in results], jnp.stack([r[1] for r in results]),
          jnp.stack([r[2] for r in results]))


def _kernels(mesh=None, rows=None):
  """The kernels, interpreted (in blocks of `rows` rows where given); on `mesh` one call per shard
  of the batch, the statistics over all the shards' images, as the model runs them."""
  kernels = lambda *args: depthwise_conv.depthwise_convs_batch_norm(
      *args, STRIDES, EPSILON, sharded.batch_axes(mesh), interpret=True, rows=rows)
  return lambda *args: sharded.on_batch_shards(mesh, kernels, args, split_in=1,
                                               split_out=(True, False, False))


def _everything(fn, x, w, scale, bias, grads, d_mean, d_var):
  (ys, means, variances), vjp = jax.vjp(fn, x, w, scale, bias)
  cotangents = ([jnp.asarray(g, y.dtype) for g, y in zip(grads, ys)], d_mean, d_var)
  return [*ys, means, variances, *vjp(cotangents)]


def _float64(arrays):
  return [np.asarray(a, np.float64) for a in arrays]


# Square and non-square maps; a map whose mean is 1e3 its spread (BatchNorm's cancellation case);
# 32 images, two blocks of 16 whose statistics the kernels merge.
@pytest.mark.parametrize('shape, offset', [((2, 14, 14, 24), 0.0), ((3, 8, 6, 16), 0.0),
                                           ((2, 7, 9, 8), 1e3), ((32, 6, 6, 8), 1e3)])
def test_outputs_statistics_and_all_gradients_are_exact_to_float32_rounding(shape, offset):
  inputs = _bn_inputs(shape, offset)
  exact = _exact_bn(*inputs)
  got = _float64(_everything(_kernels(), *inputs))
  xla = _float64(_everything(_xla, *inputs))
  for what, g, noise, want in zip(WHAT, got, xla, exact):
    # XLA's float32 path (two-pass statistics) against float64 is the noise floor.
    floor = np.abs(noise - want).max()
    assert np.abs(g - want).max() <= 4 * floor, what


_FOUR_DEVICES = r'''
import json
import jax, numpy as np
from test_tpu_depthwise_conv_batch_norm import _bn_inputs, _everything, _kernels
x, w, scale, bias, grads, d_mean, d_var = _bn_inputs((8, 6, 6, 8), 0.5)
def run(mesh):
  args = (x, w, scale, bias, grads)
  if mesh is not None:  # the batch split over the devices, the kernels on every one
    split, whole = (jax.NamedSharding(mesh, jax.P(*s)) for s in (('data',), ()))
    args = (jax.device_put(x, split), *(jax.device_put(a, whole) for a in (w, scale, bias)),
            jax.device_put(grads, split))
  fn = _kernels(mesh)
  everything = jax.jit(lambda *a: _everything(fn, *a, d_mean, d_var))(*args)
  return [np.asarray(a).tolist() for a in everything]
print('RESULT' + json.dumps({'one': run(None), 'four': run(jax.make_mesh((4,), ('data',)))}))
'''


def test_on_four_devices_the_statistics_and_their_gradients_are_the_whole_batchs():
  one_device, four_devices = on_one_and_four_cpu_devices(_FOUR_DEVICES)
  for what, one, four in zip(WHAT, one_device, four_devices):
    # Float32 reordering only; per-device statistics would differ in the first digit.
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5, err_msg=what)


def test_the_kernels_declare_their_arithmetic_and_the_bytes_they_read_and_write():
  b, h, c = 256, 14, 384
  x = jax.ShapeDtypeStruct((h, h, b, c), jnp.bfloat16)  # the kernels' layout
  w = jax.ShapeDtypeStruct((3, 9, 1, c), jnp.float32)
  rows = jax.ShapeDtypeStruct((3, 5, 1, c), jnp.float32)
  outs = depthwise_conv_whole._out_shapes(x, STRIDES)
  statistics = depthwise_conv_whole.forward_cost(x, w, outs, rows, written=False)
  backward = depthwise_conv_whole.backward_cost(x, w, outs, x, w, rows)
  image, small = h * h * c * 2, (h // 2) * (h // 2) * c * 2  # bf16 maps
  assert statistics.bytes_accessed >= b * image  # the map, and no output
  assert statistics.bytes_accessed < b * (image + small)
  assert backward.bytes_accessed >= b * (3 * image + 2 * small)  # x, dq, dx; dk, dv
  taps = 2 * 9 * b * c
  assert statistics.flops == taps * (h * h + 2 * (h // 2) ** 2)
  # dx and dw at full resolution for each of the three convolutions, and the outputs recomputed
  assert backward.flops == taps * (2 * 3 * h * h + h * h + 2 * (h // 2) ** 2)


@pytest.mark.parametrize('slice_name', MOSAIC_SLICES)
@pytest.mark.parametrize('b', [8, 256])
def test_mosaic_compiles_cvt13_last_stage_with_its_batch_norms(b, slice_name):
  device = aot_compile.slice_devices(tpus.parse_slice(slice_name))[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  h, c = 14, 384
  x = jax.ShapeDtypeStruct((b, h, h, c), jnp.bfloat16, sharding=placed)
  rows = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=placed) for s in ((3, 9, c), (3, c))]
  grads = [jax.ShapeDtypeStruct((b, depthwise_conv.out_size(h, s), depthwise_conv.out_size(h, s), c),
                                jnp.bfloat16, sharding=placed) for s in STRIDES]

  def step(x, w, scale, bias, grads):
    fn = lambda *a: depthwise_conv.depthwise_convs_batch_norm(*a, STRIDES, EPSILON)
    out, vjp = jax.vjp(fn, x, w, scale, bias)
    return out, vjp((grads, jnp.zeros_like(scale), jnp.zeros_like(scale)))

  cost = compiler.cost_analysis(
      jax.jit(step).lower(x, rows[0], rows[1], rows[1], grads).compile())
  image = b * h * h * c * 2
  assert cost['bytes accessed'] >= 4 * image  # x twice forward and twice backward, at least
  assert cost['flops'] >= 5 * 2 * 9 * b * h * h * c  # four convolutions' worth and dw
