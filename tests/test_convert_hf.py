"""HF transformers CvT checkpoints: loading, the key table, config mapping, export and round trip."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import CvtConfig, CvtForImageClassification

import cvt_flax
from cvt_flax.convert import (ConversionError, config_from_hf, config_to_hf,
                              hf_to_official_state_dict, load_pytorch, official_to_hf_state_dict,
                              save_hf)
from helpers import DATA, PARITY_ATOL, load_fixture, logits_and_features, perturb_

# Not the defaults: other widths/heads, mixed qkv_bias, a stride-1 kv projection, cls token last.
# transformers needs depth[i] > i (it indexes per-stage drop-path rates by the stage index).
_HF_FIELDS = dict(embed_dim=[16, 24, 40], num_heads=[2, 3, 5], depth=[1, 2, 3],
                  patch_sizes=[5, 3, 3], patch_stride=[2, 2, 2], patch_padding=[2, 1, 1],
                  qkv_bias=[False, True, False], cls_token=[False, False, True],
                  mlp_ratio=[2.0, 3.0, 4.0], stride_kv=[2, 1, 2], num_labels=7)


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  model = CvtForImageClassification(CvtConfig(**_HF_FIELDS))
  perturb_(model, seed=5)  # BatchNorm running stats and affine, and every other tensor
  return model.eval()


@pytest.fixture(scope='module')
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf') / 'cvt-small'
  hf_model.save_pretrained(path)
  return path


def _hf_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x)).logits.numpy()


_INPUTS = [np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32),
           np.random.default_rng(1).normal(size=(2, 3, 40, 24)).astype(np.float32)]


def _assert_matches_hf(model, hf_model):
  for x in _INPUTS:
    logits, _ = logits_and_features(model, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, _hf_logits(hf_model, x), atol=1e-5, rtol=0)


def test_hf_safetensors_directory_matches_transformers(hf_dir, hf_model):
  model = load_pytorch(hf_dir)
  assert model.config.activation == 'gelu' and model.config.num_classes == 7
  assert model.config.num_heads == (2, 3, 5) and model.config.qkv_bias == (False, True, False)
  _assert_matches_hf(model, hf_model)


def test_hf_pytorch_model_bin_and_weights_file(hf_dir, hf_model, tmp_path):
  (tmp_path / 'config.json').write_text((hf_dir / 'config.json').read_text())
  torch.save(hf_model.state_dict(), tmp_path / 'pytorch_model.bin')
  _assert_matches_hf(load_pytorch(tmp_path), hf_model)
  _assert_matches_hf(load_pytorch(hf_dir / 'model.safetensors'), hf_model)  # config beside it


def test_hf_round_trip_is_exact(hf_dir, tmp_path):
  save_hf(load_pytorch(hf_dir), tmp_path / 'out')
  before = safetensors.numpy.load_file(hf_dir / 'model.safetensors')
  after = safetensors.numpy.load_file(tmp_path / 'out' / 'model.safetensors')
  assert sorted(before) == sorted(after)
  for key, value in before.items():
    assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
    assert np.array_equal(after[key], value), key


def test_exported_hf_directory_loads_in_transformers(hf_dir, hf_model, tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  save_hf(load_pytorch(hf_dir), tmp_path / 'out')
  reloaded = CvtForImageClassification.from_pretrained(tmp_path / 'out').eval()
  for x in _INPUTS:
    np.testing.assert_array_equal(_hf_logits(reloaded, x), _hf_logits(hf_model, x))


def test_hf_checkpoint_loads_without_torch(hf_dir, hf_model):
  script = ('import sys; sys.modules["torch"] = None  # any torch import now fails\n'
            'import jax, numpy as np, cvt_flax\n'
            'from flax import nnx\n'
            f'graphdef, state = nnx.split(cvt_flax.load_pytorch({str(hf_dir)!r}))\n'
            f'x = np.load({str(hf_dir / "x.npy")!r})\n'
            'logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)\n'
            'print("LOGITS", repr(np.asarray(logits).ravel().tolist()))\n')
  x = _INPUTS[0]
  np.save(hf_dir / 'x.npy', x.transpose(0, 2, 3, 1))
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
  line = next(l for l in out.stdout.splitlines() if l.startswith('LOGITS'))
  logits = np.array(eval(line[len('LOGITS '):])).reshape(2, 7)  # pylint: disable=eval-used
  np.testing.assert_allclose(logits, _hf_logits(hf_model, x), atol=1e-5, rtol=0)


def test_key_table_covers_cvt13_both_ways():
  manifest = json.loads((DATA / 'official_manifests.json').read_text())['cvt-13-224x224']
  with torch.device('meta'):
    hf_cvt13 = CvtForImageClassification(CvtConfig(num_labels=1000))
  hf_shapes = {k: list(v.shape) for k, v in hf_cvt13.state_dict().items()}
  assert hf_to_official_state_dict(hf_shapes) == manifest['state_dict']
  assert official_to_hf_state_dict(manifest['state_dict']) == hf_shapes


def test_hf_config_mapping():
  cfg = cvt_flax.make_config(dict(
      dim_embed=(16, 32), num_heads=(2, 4), depth=(1, 3), patch_size=(5, 3), patch_stride=(3, 2),
      patch_padding=(1, 1), cls_token=(False, True), qkv_proj_method=('dw_bn', 'dw_bn'),
      kernel_qkv=(5, 3), stride_kv=(1, 2), stride_q=(2, 1), padding_kv=(2, 1), padding_q=(2, 0),
      qkv_bias=(False, True), mlp_ratio=(1.5, 3.0), drop_rate=(0.1, 0.0),
      attn_drop_rate=(0.0, 0.2), drop_path_rate=(0.05, 0.3), num_classes=11, in_chans=1,
      activation='gelu'))
  hf = config_to_hf(cfg)
  assert config_from_hf(hf) == cfg
  theirs = CvtConfig.from_dict(hf)  # transformers' strict config accepts it as is
  assert (theirs.kernel_qkv, theirs.padding_q, theirs.num_labels) == ([5, 3], [2, 0], 11)
  quick = dataclasses.replace(cfg, activation='quick_gelu')
  with pytest.warns(UserWarning, match='always runs exact GELU'):
    assert config_from_hf(config_to_hf(quick)) == quick  # restored from `hidden_act`
  # Fields a config.json leaves out take transformers' defaults (the CvT-13 values).
  assert config_from_hf({'model_type': 'cvt', 'num_labels': 3}) == cvt_flax.make_config(
      'cvt-13', num_classes=3, activation='gelu')


def test_transformers_cannot_run_avg_so_we_read_it_as_official_avg(tmp_path):
  """transformers' CvT raises on 'avg'; an 'avg' HF checkpoint is read with the official meaning."""
  hf_avg = CvtForImageClassification(CvtConfig(**dict(_HF_FIELDS, qkv_projection_method=[
      'avg', 'dw_bn', 'avg']))).eval()
  with pytest.raises(AttributeError, match='convolution_projection'):
    hf_avg(torch.from_numpy(_INPUTS[0]))
  meta, io = load_fixture('official_tiny_avg')
  official = load_pytorch(DATA / 'official_tiny_avg.pth', spec=DATA / 'official_tiny_avg.json')
  with pytest.warns(UserWarning, match='always runs exact GELU'):
    save_hf(official, tmp_path / 'avg')
  with pytest.warns(UserWarning, match="transformers cannot run methods other than 'dw_bn'"):
    model = load_pytorch(tmp_path / 'avg')
  assert model.config.qkv_proj_method == ('avg', 'dw_bn', 'avg')
  logits, _ = logits_and_features(model, io['input_0'].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, io['logits_0'], atol=1e-5, rtol=0)
  assert meta['num_classes'] == model.config.num_classes


def test_hf_bad_input(hf_dir, tmp_path):
  no_config = tmp_path / 'no_config'
  no_config.mkdir()
  (no_config / 'model.safetensors').write_bytes((hf_dir / 'model.safetensors').read_bytes())
  with pytest.raises(ConversionError, match='HF checkpoint directory without config.json'):
    load_pytorch(no_config)
  with pytest.raises(ConversionError, match='HF-layout weights .* need the HF `config.json`'):
    load_pytorch(no_config / 'model.safetensors')
  with pytest.raises(ConversionError, match='a directory without model.safetensors or '
                                           'pytorch_model.bin'):
    load_pytorch(tmp_path)
  data = (hf_dir / 'model.safetensors').read_bytes()
  (no_config / 'model.safetensors').write_bytes(data[:len(data) // 2])
  (no_config / 'config.json').write_text('{"model_type": "cvt",')
  with pytest.raises(ConversionError, match=r'config.json: not a readable JSON HF config'):
    load_pytorch(no_config)
  (no_config / 'config.json').write_text((hf_dir / 'config.json').read_text())
  with pytest.raises(ConversionError, match='not a valid safetensors file, truncated or corrupted'):
    load_pytorch(no_config)
  tensors = safetensors.numpy.load_file(hf_dir / 'model.safetensors')
  tensors['cvt.encoder.stages.0.extra.weight'] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(tensors, no_config / 'model.safetensors')
  with pytest.raises(ConversionError, match=r'1 keys with no official counterpart.*stages\.0\.extra'):
    load_pytorch(no_config)


def test_cli_check_on_hf_source_uses_transformers(hf_dir, tmp_path, capsys):
  from cvt_flax.convert.__main__ import main  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'small.pth'
  assert main([str(hf_dir), str(out), '--format', 'official', '--check', '--check-size', '32']) == 0
  printed = capsys.readouterr().out
  assert 'Flax vs transformers CvtForImageClassification' in printed
  diff = float(printed.split('max |logit difference| = ')[1].split()[0])
  assert diff < 1e-5
  assert sorted(torch.load(out, weights_only=True)) == sorted(
      hf_to_official_state_dict(safetensors.numpy.load_file(hf_dir / 'model.safetensors')))


def test_hf_tiny_fixture_holds_the_official_fixture():
  """tests/data/hf_tiny (the core-install test's checkpoint) is official_tiny in HF's layout: its
  logits are the official PyTorch logits, and its tensors the official ones, renamed."""
  model = cvt_flax.from_pretrained(DATA / 'hf_tiny')
  _, io = load_fixture('official_tiny')
  for i in (0, 1):
    logits, _ = logits_and_features(model, io[f'input_{i}'].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, io[f'logits_{i}'], rtol=0, atol=PARITY_ATOL)
  official = torch.load(DATA / 'official_tiny.pth', weights_only=True)
  renamed = hf_to_official_state_dict(safetensors.numpy.load_file(DATA / 'hf_tiny' /
                                                                  'model.safetensors'))
  assert sorted(renamed) == sorted(official)
  for key, value in renamed.items():
    np.testing.assert_array_equal(value, official[key].numpy(), err_msg=key)
