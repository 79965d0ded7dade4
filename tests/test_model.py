"""The model against the official PyTorch golden data, and its shape/config contract."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import cvt_flax
from cvt_flax.convert.official import to_official_state_dict
from cvt_flax.models import layers
from helpers import DATA, PARITY_ATOL, fixture_model, load_fixture, logits_and_features


@pytest.mark.parametrize('name', ['official_tiny', 'official_tiny_avg'])
@pytest.mark.parametrize('impl', ['shifts', 'xla'])
def test_fixture_logits_and_stages_match_official(name, impl):
  # Flax float32 here vs PyTorch float32 on another CPU: two float32 roundings, measured <= 2.6e-6
  # apart (each <= 3.0e-6 from float64, see helpers.py); the parity bar is 1e-5.
  model, meta, io = fixture_model(name, dwconv_impl=impl)
  for i in range(len(meta['input_shapes'])):
    images = io[f'input_{i}'].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    logits, feats = logits_and_features(model, images)
    np.testing.assert_allclose(logits, io[f'logits_{i}'], atol=PARITY_ATOL, rtol=0)
    for s in range(3):
      np.testing.assert_allclose(np.asarray(feats[f'stage{s}']).transpose(0, 3, 1, 2),
                                 io[f'stage{s}_{i}'], atol=PARITY_ATOL, rtol=0)


def test_batch_of_one_matches_batch():
  model, _, io = fixture_model('official_tiny')
  images = io['input_1'].transpose(0, 2, 3, 1)
  one = model(images[:1])
  assert one.shape == (1, 10)
  np.testing.assert_allclose(one, io['logits_1'][:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant,count', [('cvt-13', 19_997_480), ('cvt-21', 31_622_696),
                                           ('cvt-w24', 277_196_392), ('tiny', 50_632)])
def test_exact_parameter_counts(variant, count):
  abstract = nnx.eval_shape(lambda: cvt_flax.create_model(variant, rngs=nnx.Rngs(0)))
  assert cvt_flax.count_params(abstract) == count


def test_per_stage_defaults_for_any_stage_count():
  """A field left out takes the official default's first entry in the first stage, its last in
  the last stage and its middle one between; three stages get the official defaults."""
  assert cvt_flax.make_config(dict(dim_embed=(8, 16, 24), num_heads=(1, 1, 1))) == \
      cvt_flax.make_config(dict(dim_embed=(8, 16, 24), num_heads=(1, 1, 1), depth=(1, 2, 10),
                                patch_size=(7, 3, 3), cls_token=(False, False, True)))
  one = cvt_flax.make_config(dict(dim_embed=(8,), num_heads=(1,)))
  assert (one.patch_size, one.patch_stride, one.cls_token) == ((7,), (4,), (False,))
  assert one.depth == (1,)
  four = cvt_flax.make_config(dict(dim_embed=(8, 16, 24, 32), num_heads=(1, 1, 1, 1)))
  assert four.patch_stride == (4, 2, 2, 2) and four.depth == (1, 2, 2, 10)
  assert four.cls_token == (False, False, False, True)
  assert four.drop_path_rate == (0.0, 0.0, 0.0, 0.1)


def test_official_manifest_keys_and_shapes():
  manifests = json.loads((DATA / 'official_manifests.json').read_text())
  variants = {'cvt-13-224x224': 'cvt-13', 'cvt-21-224x224': 'cvt-21', 'cvt-w24-384x384': 'cvt-w24'}
  for key, variant in variants.items():
    abstract = nnx.eval_shape(lambda v=variant: cvt_flax.create_model(v, rngs=nnx.Rngs(0)))
    shapes = {k: list(v.shape) for k, v in
              to_official_state_dict(abstract).items()}
    assert shapes == manifests[key]['state_dict'], key


@pytest.mark.parametrize('size,maps', [(224, (56, 28, 14)), (384, (96, 48, 24))])
def test_feature_map_shapes(size, maps):
  model = cvt_flax.create_model('cvt-13', rngs=nnx.Rngs(0))
  model.eval()
  out = jax.eval_shape(lambda x: nnx.merge(*nnx.split(model)).features(x),
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  for s, (m, c) in enumerate(zip(maps, (64, 192, 384))):
    assert out[f'stage{s}'].shape == (1, m, m, c)
  assert out['cls_token'].shape == (1, 384)
  assert out['pre_logits'].shape == (1, 384)


def test_train_eval_modes_and_stochastic_depth_schedule():
  model = cvt_flax.create_model('cvt-13', rngs=nnx.Rngs(0))
  rates = [b.drop_path.rate for b in model.stage2.blocks]
  np.testing.assert_allclose(rates, np.linspace(0.0, 0.1, 10))
  assert [b.drop_path.rate for b in model.stage0.blocks] == [0.0]
  model.eval()
  assert model.stage2.blocks[3].drop_path.deterministic
  assert model.stage0.blocks[0].attn.conv_proj_q.bn.use_running_average
  model.train()
  assert not model.stage2.blocks[3].attn.conv_proj_k.bn.use_running_average


def _tiny(**overrides):
  fields = dict(variant='tiny', dim_embed=(8, 16), drop_path_rate=(0.0, 0.0), num_classes=5)
  fields.update(overrides)
  return cvt_flax.create_model(fields, rngs=nnx.Rngs(0))


def test_linear_method_runs_and_has_no_conv_projection():
  model = _tiny(qkv_proj_method=('linear', 'linear'))
  assert not hasattr(model.stage0.blocks[0].attn, 'conv_proj_q')
  out = model(jnp.ones((2, 15, 9, 3)))
  assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))


def test_training_mode_updates_batch_stats_like_torch():
  model = _tiny()
  bn = model.stage0.blocks[0].attn.conv_proj_k.bn
  model(jax.random.normal(jax.random.key(1), (4, 16, 16, 3)))
  assert int(bn.num_batches_tracked.get_value()) == 1
  assert not np.allclose(bn.mean.get_value(), 0.0)


def test_bad_images_give_clear_errors():
  model = _tiny()
  with pytest.raises(ValueError, match=r'NHWC.*\(2, 3, 16, 16\).*NCHW'):
    model(jnp.ones((2, 3, 16, 16)))
  with pytest.raises(ValueError, match=r'got shape \(16, 16, 3\)'):
    model(jnp.ones((16, 16, 3)))
  with pytest.raises(ValueError, match='floating-point'):
    model(jnp.ones((1, 16, 16, 3), jnp.uint8))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='Unknown CvT variant'):
    cvt_flax.create_model('cvt-99', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='not divisible by 3 heads'):
    _tiny(num_heads=(1, 3))
  with pytest.raises(ValueError, match='unknown fields'):
    _tiny(dim_embd=(8, 16))
  with pytest.raises(ValueError, match='qkv_proj_method'):
    _tiny(qkv_proj_method=('dw_bn', 'conv'))


def test_official_yaml_config(tmp_path):
  meta, _ = load_fixture('official_tiny')
  import yaml
  path = tmp_path / 'cvt.yaml'
  path.write_text(yaml.safe_dump({'MODEL': {'NUM_CLASSES': 10, 'SPEC': meta['spec']}}))
  cfg = cvt_flax.configs_from_official_yaml(str(path))
  assert cfg.dim_embed == (16, 32, 48) and cfg.num_classes == 10
  assert cfg.to_official_spec()['DEPTH'] == meta['spec']['DEPTH']


def test_activations():
  x = jnp.linspace(-4, 4, 101)
  np.testing.assert_allclose(layers.quick_gelu(x), x * jax.nn.sigmoid(1.702 * x), rtol=1e-6)
  exact = torch.nn.functional.gelu(torch.tensor(np.asarray(x)), approximate='none').numpy()
  np.testing.assert_allclose(layers.exact_gelu(x), exact, atol=1e-6)


def test_avg_pool_matches_torch_ceil_mode():
  x = np.random.default_rng(0).normal(size=(2, 9, 7, 4)).astype(np.float32)
  for k, s, p in [(3, 2, 1), (3, 2, 0), (2, 2, 1), (3, 3, 1)]:
    ref = torch.nn.AvgPool2d(k, s, p, ceil_mode=True)(torch.tensor(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(layers.avg_pool_ceil(jnp.asarray(x), k, s, p),
                               ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_attention_maps_are_probabilities_and_leave_no_state():
  model = _tiny()
  model.eval()
  maps = cvt_flax.models.attention_maps(model, jnp.ones((2, 16, 16, 3)))
  # stage 1: 4x4 tokens + cls as queries; kv subsampled by stride 2 -> 2x2 + cls.
  assert maps[1][0].shape == (2, 2, 17, 5)
  np.testing.assert_allclose(maps[1][0].sum(-1), 1.0, rtol=1e-5)
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
  assert model.stage1.blocks[0].attn.record_attention is False
