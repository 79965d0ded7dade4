"""The from-scratch PyTorch reference against the official fixtures and the Flax model.

Tolerances: see the noise floors in helpers.py. The fixtures are float32 outputs of the official
model made on another CPU; they are compared with the reference in float64 (exact to ~1e-15 on
any CPU), so that comparison does not depend on this machine, and the reference's own float32
run is compared with its float64 run.
"""
import json

import numpy as np
import pytest
import torch

import cvt_flax
from cvt_flax.convert.official import load_official_state_dict
from cvt_flax.models import abstract_model, finish_abstract_model
from cvt_flax.convert.torch_reference import build_reference_model
from helpers import (DATA, LOGITS_FP32_PAIR_ATOL, PARITY_ATOL, float64_reference, load_fixture,
                     logits_and_features, perturb_)


def _fixture_reference(name):
  meta, io = load_fixture(name)
  model = build_reference_model(meta['spec'], meta['num_classes'], activation=meta['activation'])
  model.load_state_dict(torch.load(DATA / f'{name}.pth', weights_only=True), strict=True)
  return model.eval(), meta, io


def _outputs(model, images, dtype):
  """[stage maps..., logits] of the torch reference as numpy arrays."""
  x = torch.from_numpy(images).to(dtype)
  with torch.no_grad():
    maps, _ = model.forward_stages(x)
    return [t.numpy() for t in maps] + [model(x).numpy()]


@pytest.mark.parametrize('name', ['official_tiny', 'official_tiny_avg'])
def test_reference_reproduces_official_fixtures(name):
  model, meta, io = _fixture_reference(name)
  exact = float64_reference(name)
  for i in range(len(meta['input_shapes'])):
    want = [io[f'stage{s}_{i}'] for s in range(3)] + [io[f'logits_{i}']]
    truth = _outputs(exact, io[f'input_{i}'], torch.float64)
    float32 = _outputs(model, io[f'input_{i}'], torch.float32)
    for fixture, t, ours in zip(want, truth, float32):
      # The fixture's float32 rounding (made elsewhere): measured <= 2.9e-6 on every machine.
      np.testing.assert_allclose(t, fixture, atol=PARITY_ATOL, rtol=0)
      # This machine's float32 rounding: measured <= 3.0e-6.
      np.testing.assert_allclose(ours, t, atol=PARITY_ATOL, rtol=0)


def test_reference_batch_of_one_keeps_batch_axis():
  model, _, io = _fixture_reference('official_tiny')
  with torch.no_grad():
    one = model(torch.from_numpy(io['input_1'][:1]))
  assert one.shape == (1, 10)
  # float32 logits here vs the fixture's float32 logits from another CPU (floor <= 1.6e-7).
  np.testing.assert_allclose(one.numpy(), io['logits_1'][:1], atol=LOGITS_FP32_PAIR_ATOL, rtol=0)


def test_reference_state_dict_matches_official_manifests():
  manifests = json.loads((DATA / 'official_manifests.json').read_text())
  variants = {'cvt-13-224x224': 'cvt-13', 'cvt-21-224x224': 'cvt-21', 'cvt-w24-384x384': 'cvt-w24'}
  for key, variant in variants.items():
    with torch.device('meta'):  # shapes only: W24 would take over a GB
      model = build_reference_model(cvt_flax.make_config(variant))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifests[key]['state_dict'], key
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == manifests[key]['num_params'], key


_SMALL = dict(dim_embed=(8, 16, 24), num_heads=(1, 2, 3), depth=(1, 1, 2), patch_size=(5, 3, 3),
              patch_stride=(2, 2, 2), patch_padding=(2, 1, 1), qkv_bias=(True, False, True),
              mlp_ratio=(2.0, 3.0, 4.0), drop_path_rate=(0.0,) * 3, num_classes=6)


@pytest.mark.parametrize('methods,activation,cls_last', [
    (('linear', 'dw_bn', 'linear'), 'quick_gelu', True),
    (('dw_bn', 'avg', 'dw_bn'), 'gelu', True),
    (('avg', 'linear', 'dw_bn'), 'gelu', False),
])
def test_reference_agrees_with_flax_beyond_the_fixtures(methods, activation, cls_last):
  cfg = cvt_flax.make_config(dict(_SMALL, qkv_proj_method=methods, activation=activation,
                                  cls_token=(False, False, cls_last)))
  torch.manual_seed(0)
  reference = build_reference_model(cfg)
  perturb_(reference, seed=1)
  reference.eval()
  flax_model = abstract_model(cfg)
  load_official_state_dict(flax_model, {k: v.numpy() for k, v in reference.state_dict().items()})
  finish_abstract_model(flax_model).eval()
  x = np.random.default_rng(2).normal(size=(2, 3, 29, 37)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(x)).numpy()
  logits, _ = logits_and_features(flax_model, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, want, atol=PARITY_ATOL, rtol=0)  # framework vs framework
