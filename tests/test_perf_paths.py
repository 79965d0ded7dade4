"""Every compute path against its reference implementation: depthwise conv and attention cores,
the CPU backend's fusion barrier and compiler options, and the choice of paths per platform.

The fixture tests in test_model.py run the default paths; here each alternative is compared with
the reference one directly, forward and gradient, on shapes that reach its special cases.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.models import Compute, compute, cpu
from cvt_flax.runtime import compiler
from helpers import PARITY_ATOL, fixture_model, load_config_module

# Two float32 computations of the same function that differ only in summation order, on values of
# order 1 to 10 (random inputs, 9- to 50-term sums): measured <= 4e-6 apart; a few ulps of 10.
ATOL = 2e-5


def _compute(**settings):
  return Compute(platform='cpu', **settings).resolved()


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize('hw,kernel,stride,padding', [
    ((9, 7), 3, 1, 1),    # odd, non-square, the q projection
    ((9, 7), 3, 2, 1),    # strided k/v projection on odd sizes
    ((8, 8), 3, 2, 0),    # no padding
    ((11, 6), 5, 2, 2),   # larger kernel
    ((5, 5), 1, 1, 0),    # 1x1
])
def test_depthwise_conv_shifts_matches_xla_forward_and_gradient(hw, kernel, stride, padding):
  x = _normal(0, (2, *hw, 6))
  w = _normal(1, (kernel, kernel, 1, 6))
  cotangent = None

  def run(impl):
    nonlocal cotangent
    out, vjp = jax.vjp(
        lambda x, w: compute.depthwise_conv(_compute(dwconv_impl=impl), x, w, stride, padding), x, w)
    if cotangent is None:
      cotangent = _normal(2, out.shape)
    return out, vjp(cotangent)

  ref_out, ref_grads = run('xla')
  out, grads = run('shifts')
  np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=ATOL, rtol=0)


# (b, heads, q tokens, kv tokens) with block sizes that make 'blocked' group several pairs per
# step with a remainder (2*3 pairs, 4 per step), or split queries into padded blocks (37 -> 3 x 13).
ATTENTION_CASES = [
    ((2, 3, 17, 5), 4 * 5 * 17 * 4),
    ((2, 1, 37, 11), 4 * 11 * 13),
    ((1, 2, 50, 13), 4 * 13 * 50),  # exactly one pair per step
]


@pytest.mark.parametrize('shape,block_bytes', ATTENTION_CASES)
@pytest.mark.parametrize('impl', ['deferred', 'recompute', 'blocked'])
def test_attention_impls_match_softmax_forward_and_gradient(monkeypatch, shape, block_bytes, impl):
  monkeypatch.setattr(cpu, 'attention_block_bytes', lambda: block_bytes)
  monkeypatch.setattr(cpu, 'BLOCKING_MIN_BLOCKS', 0)
  b, h, nq, nk = shape
  q, k, v = _normal(0, (b, h, nq, 8)), _normal(1, (b, h, nk, 8)), _normal(2, (b, h, nk, 8))
  cotangent = _normal(3, (b, h, nq, 8))

  def run(impl):
    settings = _compute(attention_impl=impl)
    out, vjp = jax.vjp(lambda q, k, v: compute.attention(settings, q, k, v, 0.35), q, k, v)
    return out, vjp(cotangent)

  ref_out, ref_grads = run('softmax')
  out, grads = jax.jit(lambda: run(impl))()
  np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=ATOL, rtol=0)


def test_blocked_attention_takes_the_loop_only_for_large_scores(monkeypatch):
  calls = []
  monkeypatch.setattr(cpu, '_blocked_attention', lambda *a: calls.append(a) or a[0])
  blocked = _compute(attention_impl='blocked')
  small = _normal(0, (1, 1, 16, 8))
  compute.attention(blocked, small, small, small, 1.0)
  assert not calls
  large = jax.ShapeDtypeStruct((32, 1, 3136, 64), jnp.float32)  # CvT-13's first stage
  kv = jax.ShapeDtypeStruct((32, 1, 784, 64), jnp.float32)
  jax.eval_shape(lambda q, k: compute.attention(blocked, q, k, k, 1.0), large, kv)
  assert len(calls) == 1


def test_attention_dropout_and_recording_use_the_probabilities():
  q = _normal(0, (2, 1, 6, 4))
  recorded = []
  dropped = compute.attention(_compute(attention_impl='blocked'), q, q, q, 0.5,
                              record=recorded.append, dropout=lambda p: p * 0)
  np.testing.assert_allclose(recorded[0].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(dropped, 0.0)


@pytest.mark.parametrize('impl', ['softmax', 'deferred', 'recompute', 'blocked'])
def test_fixture_logits_with_each_attention_impl(monkeypatch, impl):
  # Small blocks so that 'blocked' really loops on the tiny fixture model.
  monkeypatch.setattr(cpu, 'attention_block_bytes', lambda: 1024)
  monkeypatch.setattr(cpu, 'BLOCKING_MIN_BLOCKS', 0)
  model, _, io = fixture_model('official_tiny', attention_impl=impl)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  for i in range(2):
    logits = forward(state, io[f'input_{i}'].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, io[f'logits_{i}'], atol=PARITY_ATOL, rtol=0)


def test_attention_blocks_are_sized_from_the_reported_l2_cache(tmp_path):
  for index, (level, size) in enumerate([('1', '48K'), ('2', '512K'), ('3', '32768K')]):
    (tmp_path / f'index{index}').mkdir()
    (tmp_path / f'index{index}' / 'level').write_text(level + '\n')
    (tmp_path / f'index{index}' / 'size').write_text(size + '\n')
  assert cpu.l2_cache_bytes(str(tmp_path)) == 512 * 2 ** 10
  assert cpu.l2_cache_bytes(str(tmp_path / 'missing')) == 2 ** 20  # the OS does not say
  assert cpu.attention_block_bytes() == cpu.l2_cache_bytes()


def test_unknown_attention_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="attention_impl='splash' is not one of"):
    cvt_flax.create_model('cvt-13', rngs=nnx.Rngs(0), attention_impl='splash')


def test_compute_settings_are_not_architecture():
  with pytest.raises(ValueError, match=r"\['attention_impl'\] are compute settings"):
    cvt_flax.make_config('cvt-13', attention_impl='softmax')


@pytest.mark.parametrize('platform,dwconv,attention,mlp,barrier,per_token', [
    ('cpu', 'shifts', 'blocked', 'xla', True, True), ('gpu', 'xla', 'deferred', 'xla', False, False),
    ('tpu', 'fused', 'flash', 'fused', False, False)])
def test_auto_takes_the_paths_of_the_platform(platform, dwconv, attention, mlp, barrier, per_token):
  resolved = Compute(platform=platform).resolved()
  assert (resolved.dwconv_impl, resolved.attention_impl, resolved.mlp_impl,
          resolved.fusion_barrier, resolved.per_token_linear) == (
              dwconv, attention, mlp, barrier, per_token)
  explicit = Compute(platform=platform, attention_impl='softmax').resolved()
  assert explicit.attention_impl == 'softmax'
  model = cvt_flax.create_model('cvt-13', rngs=nnx.Rngs(0), platform=platform)
  assert model.stage2.blocks[0].attn.compute == resolved


def test_choices_name_each_ops_path_and_why():
  """What `auto` resolves to for CvT-13 at 224, stage by stage, as the trainer's log, its
  compute.json and `python -m cvt_flax.aot` show it."""
  cfg = cvt_flax.make_config('cvt-13')
  paths = lambda settings, batch=256: [(r['conv'][0], r['attention'][0], r['mlp'][0])
                                      for r in compute.choices(settings, cfg, 224, 224, batch)]
  tpu_bf16 = compute.make_compute(dtype='bfloat16', platform='tpu')
  assert paths(tpu_bf16) == [('fused', 'token_attention', 'fused')] * 3
  rows = compute.choices(tpu_bf16, cfg, 224, 224, 256)
  assert 'blocks of rows with a halo' in rows[0]['conv'][1]
  assert 'reading the map once' in rows[2]['conv'][1]
  # At 384 px the first map (96 x 96) fits the kernels' VMEM neither whole nor in blocks of rows.
  at_384 = compute.choices(tpu_bf16, cfg, 384, 384, 256)
  assert "96x96x64 map of 256 images per device does not fit" in at_384[0]['conv'][1]
  assert paths(compute.make_compute(dtype='bfloat16', platform='gpu')) == [
      ('xla', 'cudnn', 'xla')] * 3
  assert paths(compute.make_compute(platform='gpu'))[0][1] == 'deferred'  # cuDNN: bf16/fp16 only
  asked = compute.make_compute(platform='gpu', attention_impl='cudnn')  # float32: not cuDNN's
  assert 'not float32 x 64' in compute.choices(asked, cfg, 224, 224, 8)[0]['attention'][1]
  assert paths(compute.make_compute(platform='cpu')) == [('shifts', 'blocked', 'xla')] * 3
  lines = compute.describe_choices(rows)
  assert len(lines) == 3 and lines[2].startswith('stage 2 (14x14x384): conv fused (')
  config = load_config_module('digits').get_config()
  config.dtype = 'bfloat16'
  assert Compute.from_config(config, platform='tpu') == tpu_bf16


def _largest_backward_fusion(depth, barrier=True):
  """Most operands of any fusion XLA builds for the gradient of a one-stage CvT `depth` blocks deep."""
  fields = dict(dim_embed=(32,), num_heads=(1,), depth=(depth,), patch_size=(3,),
                patch_stride=(2,), patch_padding=(1,), cls_token=(True,), mlp_ratio=(2.0,),
                num_classes=3)
  model = cvt_flax.create_model(fields, rngs=nnx.Rngs(0), fusion_barrier=barrier)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x))
  hlo = jax.jit(jax.grad(loss)).lower(params, jnp.ones((2, 16, 16, 3))).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]
  return max(m.group(1).count('%') for m in re.finditer(r'fusion\((.*?)\), kind', entry))


def test_backward_fusions_do_not_grow_with_depth():
  # XLA:CPU could fuse the residual gradient across all blocks into every block's weight-gradient
  # fusion (operands growing ~14 per block: quadratic work). The barrier stops it
  # (cpu.gradient_fusion_barrier), and so does LayerNorm's closed-form gradient (its custom_vjp
  # is opaque to that fusion): with the autodiff LayerNorm, fusions grew without the barrier.
  assert _largest_backward_fusion(6) == _largest_backward_fusion(3)
  assert _largest_backward_fusion(6, barrier=False) == _largest_backward_fusion(3, barrier=False)


def test_gradient_fusion_barrier_is_the_identity_both_ways():
  x = jnp.array([1.0, -2.0, 3.0])
  np.testing.assert_array_equal(cpu.gradient_fusion_barrier(x), x)
  for cotangent in ([4.0, 5.0, 6.0], [np.nan, 5.0, 6.0]):  # the NaN case takes the other branch
    _, vjp = jax.vjp(cpu.gradient_fusion_barrier, x)
    np.testing.assert_array_equal(vjp(jnp.array(cotangent))[0], cotangent)


def test_cpu_compiler_options_shrink_the_training_temporaries():
  # XLA:CPU's default scheduler keeps the depthwise convs' shifted windows alive from the forward
  # to the backward pass; `compiler_options()` (used by every jit in cvt-flax) avoids that.
  assert compiler.compiler_options('tpu') is None
  model = cvt_flax.create_model('cvt-13', num_classes=10, rngs=nnx.Rngs(0), depth=(1, 1, 2),
                                dim_embed=(16, 32, 64), num_heads=(1, 1, 1))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad = jax.grad(lambda p, r, x: nnx.merge(graphdef, p, r, copy=True)(x).sum())
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

  def temp_bytes(options):
    compiled = jax.jit(grad, compiler_options=options).lower(params, rest, images).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(compiler.compiler_options('cpu')) < 0.8 * temp_bytes(None)


def test_cpu_compiler_options_give_reductions_not_matmuls_to_ynnpack():
  # XLA's own default of what goes to YNNPACK differs between CPUs; the CPU options state it:
  # reductions yes (XLA's column reductions are slow), matmuls no (XLA's are faster).
  fn = lambda a, b: (a @ b, jnp.sum(a * 2, axis=0))
  hlo = jax.jit(fn, compiler_options=compiler.compiler_options('cpu')).lower(
      jnp.ones((512, 256)), jnp.ones((256, 128))).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]
  assert re.search(r'= f32\[512,128\]\{1,0\} dot\(', entry), 'the matmul is not XLA\'s own dot'
  assert re.search(r'= f32\[256\]\{0\} fusion\([^\n]*"kind":"__ynn_fusion"', entry), \
      'the reduction is not a YNNPACK fusion'


def test_linear_weight_gradients_need_no_transposed_copy():
  # On CPU the model's linear layers see (batch * tokens, channels); on (batch, tokens, channels)
  # the weight gradient contracts two axes, which XLA:CPU prepares with transposing copies.
  mlp = cvt_flax.models.cvt.Mlp(16, 64, 0.0, cvt_flax.models.make_config('cvt-13'),
                                Compute(platform='cpu').resolved(), nnx.Rngs(0))
  graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
  x = _normal(0, (2, 50, 16))

  def weight_grads_hlo(call):
    loss = lambda p: jnp.sum(call(nnx.merge(graphdef, p, rest)) ** 2)
    return compiler.jit(jax.grad(loss), platform='cpu').lower(params).compile().as_text()

  assert ' transpose(' in weight_grads_hlo(lambda m: m.fc2(m.act(m.fc1(x))))
  assert ' transpose(' not in weight_grads_hlo(lambda m: m(x))
  # and the reshaped form is the same function
  m = nnx.merge(graphdef, params, rest)
  np.testing.assert_allclose(m(x), m.fc2(m.act(m.fc1(x))), atol=ATOL, rtol=0)
