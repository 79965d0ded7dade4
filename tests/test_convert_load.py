"""`load_pytorch` on official files: fixtures, training-checkpoint wrappers, spec inference, bad input."""
import dataclasses
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch

import cvt_flax
from cvt_flax.convert import ConversionError, infer_config, load_pytorch
from cvt_flax.convert.torch_reference import build_reference_model
from helpers import DATA, load_fixture, logits_and_features, perturb_


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


@pytest.mark.parametrize('name', ['official_tiny', 'official_tiny_avg'])
def test_fixtures_through_load_pytorch(name):
  meta, io = load_fixture(name)
  model = load_pytorch(DATA / f'{name}.pth', spec=DATA / f'{name}.json')
  assert model.config.activation == 'quick_gelu' and model.config.num_classes == meta['num_classes']
  assert model.stage0.blocks[0].drop_path.deterministic  # eval mode
  for i, shape in enumerate(meta['input_shapes']):  # official_tiny's input_1 is 48x80
    images = _nhwc(io[f'input_{i}'])
    assert images.shape[1:3] == tuple(shape[2:])
    logits, feats = logits_and_features(model, images)
    np.testing.assert_allclose(logits, io[f'logits_{i}'], atol=1e-5, rtol=0)
    for s in range(3):
      np.testing.assert_allclose(_nhwc(io[f'stage{s}_{i}']), feats[f'stage{s}'], atol=1e-5, rtol=0)


def _fixture_state():
  return torch.load(DATA / 'official_tiny.pth', weights_only=True)


@pytest.mark.parametrize('wrap', [
    lambda sd: {'state_dict': sd, 'epoch': 3},
    lambda sd: {'model': sd, 'optimizer': {'lr': 0.1}, 'epoch': 3},
    lambda sd: {'model': {f'module.{k}': v for k, v in sd.items()}, 'best_perf': 0.8},
    lambda sd: {f'module.{k}': v for k, v in sd.items()},
], ids=['state_dict', 'model', 'model+module', 'module'])
def test_training_checkpoint_wrappers_load(tmp_path, wrap):
  _, io = load_fixture('official_tiny')
  path = tmp_path / 'checkpoint.pth'
  torch.save(wrap(_fixture_state()), path)
  model = load_pytorch(path, spec=DATA / 'official_tiny.json')
  logits, _ = logits_and_features(model, _nhwc(io['input_0']))
  np.testing.assert_allclose(logits, io['logits_0'], atol=1e-5, rtol=0)


def test_num_classes_zero_drops_the_head():
  _, io = load_fixture('official_tiny')
  spec = DATA / 'official_tiny.json'
  full = load_pytorch(DATA / 'official_tiny.pth', spec=spec)
  backbone = load_pytorch(DATA / 'official_tiny.pth', spec=spec, num_classes=0)
  images = _nhwc(io['input_0'])
  assert backbone.head is None
  np.testing.assert_allclose(logits_and_features(backbone, images)[0],
                             logits_and_features(full, images)[1]['pre_logits'], atol=1e-6)


@pytest.mark.parametrize('manifest,variant', [('cvt-13-224x224', 'cvt-13'),
                                              ('cvt-21-224x224', 'cvt-21'),
                                              ('cvt-w24-384x384', 'cvt-w24')])
def test_spec_inferred_from_released_state_dicts(manifest, variant):
  keys = json.loads((DATA / 'official_manifests.json').read_text())[manifest]['state_dict']
  # Inference reads shapes only: zero-strided views stand in for W24's 1.1 GB of weights.
  state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in keys.items()}
  want = cvt_flax.make_config(variant)
  assert infer_config(state) == dataclasses.replace(want, drop_path_rate=(0.0, 0.0, 0.0))


def test_load_without_spec_matches_reference(tmp_path):
  """A model shaped like the released ones (widths multiple of 64, 7/3 kernels) needs no spec."""
  cfg = cvt_flax.make_config(dict(dim_embed=(64, 128), num_heads=(1, 2), depth=(1, 2),
                                  qkv_bias=(False, True), mlp_ratio=(2.0, 4.0),
                                  drop_path_rate=(0.0, 0.0), num_classes=9))
  torch.manual_seed(0)
  reference = build_reference_model(cfg)
  perturb_(reference, seed=3)
  torch.save(reference.state_dict(), tmp_path / 'small.pth')
  model = load_pytorch(tmp_path / 'small.pth')
  assert model.config == dataclasses.replace(cfg, num_classes=9)
  x = np.random.default_rng(0).normal(size=(2, 3, 40, 56)).astype(np.float32)
  with torch.no_grad():
    want = reference.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(logits_and_features(model, _nhwc(x))[0], want, atol=1e-5, rtol=0)


def test_spec_inference_errors_say_what_is_missing():
  state = {k: v.numpy() for k, v in _fixture_state().items()}
  with pytest.raises(ConversionError, match=r'width 16, not a multiple of 64.*spec'):
    infer_config(state)
  avg_state = torch.load(DATA / 'official_tiny_avg.pth', weights_only=True)
  widened = {k: np.broadcast_to(np.float32(0), (64,) + tuple(v.shape[1:]))
             if k == 'stage0.patch_embed.proj.weight' else v.numpy() for k, v in avg_state.items()}
  with pytest.raises(ConversionError, match=r"stage 0 has no convolutional q/k/v.*'avg' or 'linear'"):
    infer_config(widened)


# ----------------------------------------------------------------------------------------------------
# Bad input: every failure is a ConversionError naming the file and the problem.

class _CreatesFile:
  """A pickle payload whose unpickling would create `marker` (if it ever ran)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, 'w'))


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
  marker = tmp_path / 'PWNED'
  path = tmp_path / 'evil.pth'
  payload = {'stage0.patch_embed.proj.weight': _CreatesFile(marker)}
  if writer == 'torch.save':
    torch.save(payload, path)
  else:
    path.write_bytes(pickle.dumps(payload, protocol=2))
  with pytest.raises(ConversionError, match=rf'{path}: refused to load.*Nothing in it was executed'):
    load_pytorch(path)
  assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_text('these are not weights\n')
  with pytest.raises(ConversionError, match=rf'{path}: not a PyTorch checkpoint'):
    load_pytorch(path)
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  with pytest.raises(ConversionError, match='empty file'):
    load_pytorch(empty)


def test_truncated_pth(tmp_path):
  data = (DATA / 'official_tiny.pth').read_bytes()
  path = tmp_path / 'truncated.pth'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ConversionError, match=rf'{path}: truncated or corrupted'):
    load_pytorch(path)


def test_not_a_state_dict_and_unknown_layout(tmp_path):
  path = tmp_path / 'list.pth'
  torch.save([torch.zeros(2)], path)
  with pytest.raises(ConversionError, match='holds a list, not a state dict'):
    load_pytorch(path)
  torch.save({'backbone.conv1.weight': torch.zeros(2), 'fc.bias': torch.zeros(2)}, path)
  with pytest.raises(ConversionError, match=r'unknown key layout.*backbone\.conv1\.weight'):
    load_pytorch(path)
  torch.save({'stage0.patch_embed.proj.weight': torch.zeros(2), 'epoch': 3}, path)
  with pytest.raises(ConversionError, match="entry 'epoch' is a int, not a tensor"):
    load_pytorch(path)


def test_weights_of_another_variant_list_the_keys():
  with pytest.raises(ConversionError) as info:
    load_pytorch(DATA / 'official_tiny.pth', spec='cvt-13')
  msg = str(info.value)
  assert 'official_tiny.pth does not fit the model' in msg
  assert 'missing keys' in msg and 'stage2.blocks.9.attn.proj_q.weight' in msg
  assert 'stage0.patch_embed.proj.weight: file (16, 3, 7, 7), model (64, 3, 7, 7)' in msg


@pytest.mark.parametrize('key,bad,message', [
    ('stage2.blocks.1.mlp.fc2.bias', 'nan', 'stage2.blocks.1.mlp.fc2.bias: contains 1 NaN/Inf'),
    ('stage1.patch_embed.proj.weight', 'int',
     'stage1.patch_embed.proj.weight: dtype int32, expected a floating-point tensor'),
])
def test_bad_tensor_values_are_reported(tmp_path, key, bad, message):
  state = _fixture_state()
  if bad == 'nan':
    state[key][3] = float('nan')
  else:
    state[key] = state[key].to(torch.int32)
  torch.save(state, tmp_path / 'bad.pth')
  with pytest.raises(ConversionError, match=message):
    load_pytorch(tmp_path / 'bad.pth', spec=DATA / 'official_tiny.json')


def test_missing_file_and_bad_spec(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    load_pytorch(tmp_path / 'nope.pth')
  (tmp_path / 'spec.json').write_text('{"DIM_EMBED": [16], "WHAT": 1}')
  with pytest.raises(ConversionError, match=r'spec file .*spec.json: not a CvT spec.*WHAT'):
    load_pytorch(DATA / 'official_tiny.pth', spec=tmp_path / 'spec.json')
  assert pathlib.Path(DATA / 'official_tiny.pth').is_file()
