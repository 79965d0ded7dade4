"""The TPU backend's flash attention (`cvt_flax/models/tpu/flash_attention.py`), checked without a
TPU: its numerics in Pallas's TPU interpreter on this CPU, its declared costs against the formulas,
and its Mosaic compile for a TPU (libtpu, deviceless), where XLA must count the kernels; and the
model with all the TPU kernels (these and those of the other `tests/test_tpu_*.py`) against its XLA
path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.aot import compile as aot_compile, hlo, tpus
from cvt_flax.models import compute as compute_lib, layers, tpu, with_compute
from cvt_flax.runtime import compiler, sharding
from helpers import LOGITS_FP32_PAIR_ATOL, MOSAIC_SLICES, TINY_MODEL

# (batch, heads, queries, keys, head dim): CvT's last stage (cls + 196 queries, 50 keys: one
# partial key block) and lengths spanning several blocks, neither a multiple of 128.
SHAPES = [(2, 2, 197, 50, 64), (1, 1, 300, 200, 64)]


def _reference(q, k, v, scale, grad):
  """Softmax attention and its input gradients in float64 (NumPy), the exact answer."""
  q, k, v, grad = (np.asarray(t, np.float64) for t in (q, k, v, grad))
  scores = np.einsum('bhqd,bhkd->bhqk', q, k) * scale
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = probs @ v
  d_scores = probs * (grad @ np.swapaxes(v, -1, -2) - (grad * out).sum(-1, keepdims=True)) * scale
  return (out, d_scores @ k, np.einsum('bhqk,bhqd->bhkd', d_scores, q),
          np.einsum('bhqk,bhqd->bhkd', probs, grad))


def _output_and_grads(attention, q, k, v, grad):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(grad))


@pytest.mark.parametrize('shape', SHAPES)
def test_flash_attention_and_its_gradients_are_exact_to_float32_rounding(shape):
  b, h, nq, nk, d = shape
  rng = np.random.default_rng(0)
  q, grad = (rng.normal(size=(b, h, nq, d)).astype(np.float32) for _ in range(2))
  k, v = (rng.normal(size=(b, h, nk, d)).astype(np.float32) for _ in range(2))
  scale = (h * d) ** -0.5
  exact = _reference(q, k, v, scale, grad)
  flash = _output_and_grads(lambda q, k, v: tpu.flash_attention.flash_attention(q, k, v, scale, True),
                            q, k, v, grad)
  # The noise floor, measured here: XLA's float32 attention against the same exact answer.
  xla = _output_and_grads(lambda q, k, v: layers.recompute_attention(q, k, v, scale),
                          q, k, v, grad)
  for name, got, noise, want in zip(('out', 'dq', 'dk', 'dv'), flash, xla, exact):
    floor = np.abs(np.asarray(noise) - want).max()
    assert np.abs(np.asarray(got) - want).max() <= 4 * floor, name
    assert np.isfinite(np.asarray(got)).all(), name


def _estimates(b, h, nq, nk, d, dtype=jnp.bfloat16):
  """The three kernels' declared costs for these shapes, from the calls' own operands."""
  q = jax.ShapeDtypeStruct((b * h, nq, d), dtype)
  k = jax.ShapeDtypeStruct((b * h, nk, d), dtype)
  stats = jax.ShapeDtypeStruct((b * h, 1, nq), jnp.float32)
  return (tpu.flash_attention.forward_cost(q, k, k, q, stats), tpu.flash_attention.dq_cost(q, k, k, q, stats, stats, q),
          tpu.flash_attention.dkv_cost(q, k, k, q, stats, stats, k, k))


@pytest.mark.parametrize('shape', [(8, 1, 3136, 784, 64), (8, 6, 197, 50, 64)])
def test_every_kernel_declares_its_matmuls_and_at_least_the_bytes_it_reads_and_writes(shape):
  b, h, nq, nk, d = shape
  forward, dq, dkv = _estimates(*shape)
  # Scores computed: whole 128 x 128 blocks, padding included.
  pairs = b * h * -(-nq // 128) * 128 * -(-nk // 128) * 128
  for cost, matmuls in ((forward, 2), (dq, 3), (dkv, 4)):
    assert cost.flops == matmuls * 2 * pairs * d and cost.transcendentals == pairs
  query_side, key_side = b * h * nq * d * 2, b * h * nk * d * 2  # one bf16 (tokens, d) array
  stats = b * h * nq * 4  # one float32 value per query: lse, and the backward's delta
  assert forward.bytes_accessed >= 2 * query_side + 2 * key_side + stats  # q, out; k, v; lse
  assert dq.bytes_accessed >= 3 * query_side + 2 * key_side + 2 * stats  # q, grad, dq; k, v
  assert dkv.bytes_accessed >= 2 * query_side + 4 * key_side + 2 * stats  # q, grad; k, v, dk, dv


@pytest.fixture(scope='module', params=MOSAIC_SLICES)
def tpu_device(request):
  return aot_compile.slice_devices(tpus.parse_slice(request.param))[0]


def test_mosaic_compiles_every_stage_shape_and_xla_counts_the_kernels(tpu_device):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device)
  for b, h, nq, nk, d in [(8, 1, 3136, 784, 64), (8, 3, 784, 196, 64), (8, 6, 197, 50, 64)]:
    q = jax.ShapeDtypeStruct((b, h, nq, d), jnp.bfloat16, sharding=sharding)
    k = jax.ShapeDtypeStruct((b, h, nk, d), jnp.bfloat16, sharding=sharding)
    step = jax.jit(lambda q, k, v, g: _output_and_grads(
        lambda q, k, v: tpu.flash_attention.flash_attention(q, k, v, 0.125), q, k, v, g))
    compiled = step.lower(q, k, k, q).compile()
    cost = compiler.cost_analysis(compiled)
    declared = _estimates(b, h, nq, nk, d)
    # The compiled step's FLOPs are the kernels' (nothing else multiplies), and its bytes include
    # theirs: no kernel is counted as free.
    assert cost['flops'] >= sum(c.flops for c in declared)
    assert cost['bytes accessed'] >= sum(c.bytes_accessed for c in declared)
  # The aot report's top costs list the kernels, with the bytes of their operands and results.
  kernels = [row for row in hlo.top_costs(hlo.parse_ops(compiled.as_text()), 50, by=3)
             if row[0].startswith('custom-call:')]
  assert sum(row[1] for row in kernels) == 3 and all(row[3] > 0 for row in kernels)  # fwd, dq, dkv


# Where an image's keys fit in VMEM (both stages at 64 px) attention takes the token-layout
# kernels; with no room for them, the first stage's 256 keys take the flash kernels and the
# second's 65 'recompute'. Every block's second half and both stages' convolutions run in
# the kernels either way.
@pytest.mark.parametrize('mha_budget, keys', [(None, {'token_attention': [256, 65],
                                                      'flash_attention': []}),
                                              (0, {'token_attention': [],
                                                   'flash_attention': [256]})])
def test_model_on_the_tpu_kernels_matches_the_xla_path_in_the_interpreter(mha_budget, keys,
                                                                          monkeypatch):
  if mha_budget is not None:
    monkeypatch.setattr(tpu.token_attention, 'VMEM_BUDGET', mha_budget)
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model = cvt_flax.create_model(TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  want = np.asarray(model(images))
  ops = {'token_attention': tpu.token_attention, 'flash_attention': tpu.flash_attention,
         'fused_mlp_block': tpu.mlp_residual, 'depthwise_convs': tpu.depthwise_conv}
  calls = {name: [] for name in ops}
  for name, op in ops.items():
    def interpreted(*args, name=name, kernel=getattr(op, name)):
      calls[name].append([a.shape for a in args[:2]])
      return kernel(*args, interpret=True)
    monkeypatch.setattr(op, name, interpreted)
  got = np.asarray(with_compute(model, attention_impl='flash', mlp_impl='fused',
                                dwconv_impl='fused')(images))
  for name, want_keys in keys.items():
    assert [k[-2] for _, k in calls[name]] == want_keys, name
  assert len(calls['fused_mlp_block']) == sum(len(stage.blocks) for stage in model.stages)
  # The first stage's 32 x 32 map in blocks of rows (whole, it exceeds the VMEM budget), the
  # second's 16 x 16 whole.
  assert [shapes[0] for shapes in calls['depthwise_convs']] == [(2, 32, 32, 16), (2, 16, 16, 32)]
  # What `choices` says of each stage is what ran.
  stages = compute_lib.choices(with_compute(model, attention_impl='flash', mlp_impl='fused',
                                            dwconv_impl='fused').compute, model.config, 64, 64, 2)
  assert [r['conv'][0] for r in stages] == ['fused', 'fused']
  ran = 'token_attention' if keys['token_attention'] else 'flash'
  assert [r['attention'][0] for r in stages] == [ran, ran if mha_budget is None else 'recompute']
  assert [r['mlp'][0] for r in stages] == ['fused', 'fused']
  assert np.abs(got - want).max() <= LOGITS_FP32_PAIR_ATOL


def test_on_a_mesh_each_chip_runs_the_kernels_on_its_shard_of_the_batch():
  devices = aot_compile.slice_devices(tpus.parse_slice('v5e-4'))
  mesh = sharding.make_mesh(devices)
  model = nnx.eval_shape(lambda: cvt_flax.create_model(
      TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0), platform='tpu', attention_impl='flash',
      mesh=mesh))
  model.eval()
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((8, 128, 128, 3), jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=sharding.replicated(mesh)), state)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  # XLA cannot split a Mosaic kernel: without the per-shard call this fails to compile.
  hlo = forward.lower(state, images).compile().as_text()
  assert 'tpu_custom_call' in hlo
