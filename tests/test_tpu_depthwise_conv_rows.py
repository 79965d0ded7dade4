"""The depthwise convolutions' kernels in blocks of rows with a halo
(`cvt_flax/models/tpu/depthwise_conv_rows.py`), for maps too large for VMEM whole, checked without
a TPU: in Pallas's TPU interpreter against float64 (with and without the BatchNorms, a block's
edges at the map's and at its neighbours'), on one device and four, in a training model against
XLA's path; their declared costs; the plan; and the Mosaic compile at every stage shape of CvT-13,
CvT-21 and CvT-W24 that takes them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models.tpu import depthwise_conv, depthwise_conv_rows, depthwise_conv_whole
from cvt_flax.models.tpu.blocks import VMEM_BUDGET
from helpers import MOSAIC_SLICES, on_one_and_four_cpu_devices
import test_tpu_depthwise_conv as plain
import test_tpu_depthwise_conv_batch_norm as with_bn

STRIDES = plain.STRIDES


# Blocks of 2 rows (every block at an edge of its neighbours'), of 4 (rows inside), a non-square
# map, and 32 images (two image blocks of 16, merged with the row blocks' statistics).
CASES = [((2, 8, 6, 16), 2), ((3, 12, 10, 8), 4), ((32, 4, 6, 8), 2)]


@pytest.mark.parametrize('shape, rows', CASES)
def test_the_convolutions_and_their_gradients_are_exact_to_float32_rounding(shape, rows):
  x, w, grads = plain._inputs(shape)
  exact = plain._exact(x, w, grads)
  kernels = lambda x, w: depthwise_conv.depthwise_convs(x, w, STRIDES, interpret=True, rows=rows)
  got = plain._outputs_and_grads(kernels, x, w, grads)
  xla = plain._outputs_and_grads(plain._xla, x, w, grads)
  for what, g, noise, want in zip(plain.WHAT, got, xla, exact):
    floor = np.abs(np.asarray(noise) - want).max()  # XLA's float32 against float64
    assert np.abs(np.asarray(g) - want).max() <= 4 * floor, what


@pytest.mark.parametrize('offset', [0.0, 1e3])  # 1e3: the mean far above the spread
@pytest.mark.parametrize('shape, rows', CASES)
def test_with_batch_norms_outputs_statistics_and_gradients_are_exact_to_float32_rounding(
    shape, rows, offset):
  inputs = with_bn._bn_inputs(shape, offset)
  exact = with_bn._exact_bn(*inputs)
  got = with_bn._float64(with_bn._everything(with_bn._kernels(rows=rows), *inputs))
  xla = with_bn._float64(with_bn._everything(with_bn._xla, *inputs))
  for what, g, noise, want in zip(with_bn.WHAT, got, xla, exact):
    floor = np.abs(noise - want).max()  # XLA's float32 path (two-pass statistics) against float64
    assert np.abs(g - want).max() <= 4 * floor, what


def test_on_four_devices_the_statistics_and_their_gradients_are_the_whole_batchs():
  script = with_bn._FOUR_DEVICES.replace('fn = _kernels(mesh)', 'fn = _kernels(mesh, rows=2)')
  one_device, four_devices = on_one_and_four_cpu_devices(script)
  for what, one, four in zip(with_bn.WHAT, one_device, four_devices):
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5, err_msg=what)


def test_a_training_model_on_row_blocks_takes_the_same_steps(monkeypatch):
  """The first stage's 18 x 14 map taken as too large for VMEM whole: its kernels run in blocks of
  rows (3 blocks of 6); the loss, every gradient and the running statistics equal XLA's path."""
  plans, planned = [], depthwise_conv_rows.plan

  def plan(*args):
    plans.append(planned(*args))
    return plans[-1]
  monkeypatch.setattr(depthwise_conv_whole, 'fits', lambda b, h, w, c: h < 10)
  monkeypatch.setattr(depthwise_conv_rows, 'plan', plan)
  kernel = depthwise_conv.depthwise_convs_batch_norm
  monkeypatch.setattr(depthwise_conv, 'depthwise_convs_batch_norm',
                      lambda *args: kernel(*args, interpret=True))
  plain.assert_training_step_matches_xla()
  assert depthwise_conv_rows.RowPlan(6, 6, 6, 6) in plans


def test_the_kernels_declare_their_halo_reads_and_arithmetic():
  h, w, b, c, rows = 56, 56, 256, 64, 4
  x = jax.ShapeDtypeStruct((h, w, b, c), jnp.bfloat16)  # the kernels' layout
  wt = jax.ShapeDtypeStruct((3, 9, 1, c), jnp.float32)
  grads = depthwise_conv_rows._outputs(x, STRIDES)
  image = h * w * b * c * 2
  forward = depthwise_conv_rows._forward_cost(x, grads, rows, wt)
  # The map and a row above and below each block; q, k and v.
  assert forward.bytes_accessed >= image * (rows + 2) / rows + image * 1.5
  assert forward.flops == 2 * 9 * b * c * (h * w + 2 * (h // 2) * (w // 2))
  dx, dw = x, jax.ShapeDtypeStruct(wt.shape, jnp.float32)
  bn = jax.ShapeDtypeStruct((3, 5, 1, c), jnp.float32)
  backward = depthwise_conv_rows._backward_cost(x, wt, grads, STRIDES, rows, 2, dx, dw, bn)
  # The map with two halo rows either side, dq with one, dk and dv with one below; dx.
  assert backward.bytes_accessed >= image * ((rows + 4) / rows + (rows + 2) / rows
                                             + 2 * (rows // 2 + 1) / (rows // 2) / 4 + 1)
  # dx and dw: stride 1 at every position, stride 2 at the even rows; the outputs recomputed
  # at the block's rows and its halo's (6 of every 4 rows of q, 3 of every 2 of k and v).
  taps = 2 * 9 * b * c
  assert backward.flops == taps * (2 * 2 * h * w + h * w * 6 // 4
                                   + 2 * (h // 2) * (w // 2) * 3 // 2)


def test_the_plan_takes_the_largest_blocks_that_fit_and_refuses_what_cannot():
  block = (16, 64)
  rows = depthwise_conv_rows.plan(56, 56, block, 2)
  for kernel, r in zip(depthwise_conv_rows.KERNELS, rows):
    assert 56 % r == 0 and r % 2 == 0
    assert depthwise_conv_rows.vmem_bytes(kernel, r, 56, block, 2) <= VMEM_BUDGET
    larger = [n for n in range(r + 2, 56, 2) if 56 % n == 0]
    assert all(depthwise_conv_rows.vmem_bytes(kernel, n, 56, block, 2)
               > VMEM_BUDGET for n in larger), kernel
  assert depthwise_conv_rows.plan(7, 8, block, 2) is None  # odd sides: stride 2's pairs
  assert depthwise_conv_rows.plan(96, 96, block, 2) is None  # no 2 rows fit the backward kernel
  # CvT-13 at 224, 256 images per device: the first two stages in blocks of rows, the last whole.
  assert depthwise_conv.row_block(256, 56, 56, 64, 2) is not None
  assert depthwise_conv.row_block(256, 28, 28, 192, 2) is not None
  assert depthwise_conv.row_block(256, 14, 14, 384, 2) is None
  assert depthwise_conv.fits(256, 14, 14, 384, 2)


# Every stage map of CvT-13 and CvT-21 (the same widths) at 224 and 384, and CvT-W24 at 384,
# 256 images per device as configs/imagenet.py gives a v5e-8 slice; those that take row blocks.
STAGES = [(h, c) for h, c in [(56, 64), (28, 192), (14, 384), (96, 64), (48, 192), (24, 384),
                              (96, 192), (48, 768), (24, 1024)]
          if depthwise_conv.row_block(256, h, h, c, 2) is not None]


def test_the_stage_maps_that_take_row_blocks():
  assert STAGES == [(56, 64), (28, 192), (24, 384), (48, 768), (24, 1024)]


@pytest.mark.parametrize('slice_name', MOSAIC_SLICES)
@pytest.mark.parametrize('h, c', STAGES)
def test_mosaic_compiles_every_stage_that_takes_row_blocks(h, c, slice_name):
  device = aot_compile.slice_devices(tpus.parse_slice(slice_name))[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  b = 256
  x = jax.ShapeDtypeStruct((b, h, h, c), jnp.bfloat16, sharding=placed)
  rows = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=placed) for s in ((3, 9, c), (3, c))]
  grads = [jax.ShapeDtypeStruct((b, h // s, h // s, c), jnp.bfloat16, sharding=placed)
           for s in STRIDES]

  def step(x, w, scale, bias, grads):
    fn = lambda *a: depthwise_conv.depthwise_convs_batch_norm(*a, STRIDES, with_bn.EPSILON)
    out, vjp = jax.vjp(fn, x, w, scale, bias)
    return out, vjp((grads, jnp.zeros_like(scale), jnp.zeros_like(scale)))

  jax.jit(step).lower(x, rows[0], rows[1], rows[1], grads).compile()
