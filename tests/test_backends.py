"""Compute paths per backend, checked on CPU: what GPU and TPU programs contain, the fused
attention and remat against the reference numerics, the profiler option, and a train step that
imports without TensorFlow."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.models import Compute, compute, layers
from cvt_flax.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cvt_flax.training import steps
from helpers import PARITY_ATOL, TINY_MODEL, fixture_model, logits_and_features, run_python

# Enough width per head (64) for the paths a released model takes, small enough to lower quickly.
# The other fields: the 2-stage defaults (`cvt_flax.models.config.stage_defaults`).
SMALL = dict(dim_embed=(64, 128), num_heads=(1, 2), depth=(1, 1))
IMAGES = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)  # stage 0: 3136 queries, 784 keys
PIXELS = jax.ShapeDtypeStruct(IMAGES.shape, jnp.uint8)  # the train step's input


def _lowered(platform, dtype='float32', **settings):
  """(forward, train step) of SMALL built for `platform`, lowered there with jax.export."""
  model = cvt_flax.create_model(SMALL, num_classes=10, rngs=nnx.Rngs(0), platform=platform,
                                dtype=dtype, **settings)
  tx = optax.adamw(1e-3)
  state = steps.init_train_state(model, tx)
  train_step = steps.make_train_step(nnx.graphdef(model), tx, optax.constant_schedule(1e-3),
                                     num_classes=10, mixup=dict(prob=0.0), seed=0,
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
  batch = {'image': PIXELS, 'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
  model.eval()
  graphdef, variables = nnx.split(model)
  forward = jax.jit(lambda v, x: nnx.merge(graphdef, v)(x))
  export = lambda f, *args: jax.export.export(f, platforms=[platform])(*args).mlir_module()
  return export(forward, variables, IMAGES), export(jax.jit(train_step), state, batch)


def _cpu_only_constructs(module: str) -> list[str]:
  """The CPU backend's marks in a lowered module: the blocked attention's loop (`while`), the
  fusion barrier's conditional (`case`/`if`)."""
  return [op for op in ('stablehlo.while', 'stablehlo.case', 'stablehlo.if') if op in module]


def test_the_cpu_lowering_does_hold_the_cpu_paths():
  forward, train = _lowered('cpu')
  assert 'stablehlo.while' in forward  # blocked attention over stage 0's 3136 x 784 scores
  assert {'stablehlo.while', 'stablehlo.case'} <= set(_cpu_only_constructs(train))


@pytest.mark.parametrize('platform,dtype', [('cuda', 'float32'), ('tpu', 'bfloat16'),
                                            ('tpu', 'float32')])
def test_gpu_and_tpu_programs_hold_no_cpu_only_construct(platform, dtype):
  forward, train = _lowered(platform, dtype)
  assert not _cpu_only_constructs(forward) and not _cpu_only_constructs(train)
  if (platform, dtype) == ('tpu', 'bfloat16'):
    # The depthwise projections: Pallas kernels, both maps in blocks of rows (in float32 the
    # first map's rows are too wide for the kernels' VMEM).
    assert 'conv_proj/pallas_call' in forward and 'feature_group_count = 64' not in forward
  else:
    assert 'feature_group_count = 64' in forward  # the depthwise projections: grouped convs


def test_cuda_bf16_takes_cudnn_attention_which_needs_a_gpu_to_lower():
  """'auto' on a GPU in bf16 is cuDNN's fused attention. JAX cannot lower it on a machine without
  cuDNN ('cuDNN is not detected'), so here the choice is checked, and the same bf16 program is
  lowered with XLA's implementation of the fused attention ('xla_fused') instead."""
  assert Compute(platform='cuda', dtype='bfloat16').resolved().attention_impl == 'cudnn'
  assert Compute(platform='gpu', dtype='float32').resolved().attention_impl == 'deferred'
  with pytest.raises(RuntimeError, match='cuDNN'):
    _lowered('cuda', 'bfloat16')
  forward, train = _lowered('cuda', 'bfloat16', attention_impl='xla_fused')
  assert not _cpu_only_constructs(forward) and not _cpu_only_constructs(train)


@pytest.mark.parametrize('impl', ['xla_fused', 'cudnn'])
def test_fused_attention_matches_the_official_numerics(impl):
  # On CPU 'cudnn' finds no cuDNN-supported call (float32) and runs 'deferred': both are checked
  # against the PyTorch fixture, with the official scale width**-0.5 (not SDPA's head_dim**-0.5).
  model, meta, io = fixture_model('official_tiny', attention_impl=impl)
  for i in range(len(meta['input_shapes'])):
    logits, _ = logits_and_features(model, io[f'input_{i}'].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, io[f'logits_{i}'], atol=PARITY_ATOL, rtol=0)
  q = jax.random.normal(jax.random.key(0), (2, 3, 50, 16))
  fused = compute.attention(Compute(attention_impl='xla_fused').resolved(), q, q, q, 0.1)
  reference = compute.attention(Compute(attention_impl='softmax').resolved(), q, q, q, 0.1)
  np.testing.assert_allclose(fused, reference, atol=1e-6)  # float32, 50-term sums of O(1)


# A cls token's stage: 197 queries, 50 keys (CvT-13 at 224); both odd (CvT-21 at 384: 577, 145).
@pytest.mark.parametrize('queries, keys', [(197, 50), (37, 9)])
def test_cudnn_attention_padded_to_even_lengths_keeps_the_unpadded_numbers(queries, keys):
  """jax's cuDNN attention refuses odd lengths in training, so compute pads them by one and masks
  the padded key. The same padding and mask through XLA's implementation (CPU) gives the unpadded
  attention and gradients, to float32 rounding (the noise floor: XLA's float32 against float64)."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, n, 3, 16)) for n in (queries, keys, keys))
  cotangent = rng.normal(size=q.shape)

  def everything(attend, dtype):
    out, vjp = jax.vjp(attend, *(jnp.asarray(a, dtype) for a in (q, k, v)))
    return [np.asarray(a, np.float64) for a in (out, *vjp(jnp.asarray(cotangent, dtype)))]

  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.1, implementation='xla')
  padded = lambda q, k, v: layers.even_length_attention(q, k, v, 0.1, 'xla')
  with jax.enable_x64(True):
    exact = everything(plain, jnp.float64)
  for what, got, noise, want in zip(('out', 'dq', 'dk', 'dv'), everything(padded, jnp.float32),
                                    everything(plain, jnp.float32), exact):
    assert got.shape == want.shape, what
    assert np.abs(got - want).max() <= 2 * np.abs(noise - want).max(), what


def test_remat_gives_the_same_gradients():
  def grads(**settings):
    model = cvt_flax.create_model(TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0), **settings)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    rematerialised = 'remat2[' in str(jax.make_jaxpr(jax.grad(loss))(params, images))
    assert rematerialised == (settings.get('remat', 'none') != 'none')
    return jax.jit(jax.grad(loss))(params, images)

  plain = jax.tree.leaves(grads())
  for remat in ('block', 'dots_saveable'):
    # The recomputed forward is the same program; XLA may fuse it differently, so float32
    # rounding may differ in the last bits (measured: equal, or 1 ulp).
    for a, b in zip(plain, jax.tree.leaves(grads(remat=remat))):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=remat)


def test_profile_steps_writes_a_trace(digits_dir, tmp_path, compile_cache):
  from cvt_flax.training import loop  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4, profile_steps=2),
                               str(tmp_path))
  traces = glob.glob(os.path.join(tmp_path, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


_WITHOUT_TF = '''
import sys
sys.modules['tensorflow'] = None  # any import of TensorFlow now fails
import jax, optax
from flax import nnx
import cvt_flax, cvt_flax.io, cvt_flax.predict
from cvt_flax.runtime import eval_step
from cvt_flax.training import steps
from helpers import TINY_MODEL
model = cvt_flax.create_model(TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0))
tx = optax.adamw(1e-3)
step = steps.make_train_step(nnx.graphdef(model), tx, optax.constant_schedule(1e-3),
                             num_classes=10, mixup=dict(), seed=0, mean=(0.5,) * 3, std=(0.2,) * 3)
batch = {'image': jax.numpy.ones((4, 16, 16, 3), 'uint8'), 'label': jax.numpy.zeros((4,), 'int32'),
         'erase': jax.numpy.zeros((4, 4), 'int32')}
# Tracing runs every line of the steps' Python (compiling them adds nothing TensorFlow could be in).
state, metrics = jax.eval_shape(step, steps.init_train_state(model, tx), batch)
model.eval()
sums = jax.eval_shape(eval_step.make_eval_step(nnx.graphdef(model), mean=(0.5,) * 3, std=(0.2,) * 3),
                      steps.model_variables(state), dict(batch, mask=jax.numpy.ones((4,))))
print('OK', metrics['loss'].shape == (), sums['count'].shape == ())
'''


def test_model_train_and_eval_steps_import_without_tensorflow():
  assert run_python(_WITHOUT_TF).split()[-3:] == ['OK', 'True', 'True']


def test_platform_names_of_jax_export_resolve_like_device_platforms():
  cuda, gpu = Compute(platform='cuda').resolved(), Compute(platform='gpu').resolved()
  assert (cuda.dwconv_impl, cuda.attention_impl, cuda.fusion_barrier) == (
      gpu.dwconv_impl, gpu.attention_impl, gpu.fusion_barrier) == ('xla', 'deferred', False)
