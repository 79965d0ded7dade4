"""Shared test fixtures. The golden data lives in ../shared/fixtures (see its README)."""
import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get('CVT_FLAX_FIXTURES', ROOT.parent / 'shared' / 'fixtures'))


@pytest.fixture(scope='session')
def fixtures_dir():
  if not FIXTURES.is_dir():
    pytest.fail(f'golden fixtures not found at {FIXTURES} (set CVT_FLAX_FIXTURES)')
  return FIXTURES


def load_fixture(name):
  """(meta json, io npz) of an official fixture, e.g. 'official_tiny'."""
  meta = json.loads((FIXTURES / f'{name}.json').read_text())
  io = dict(np.load(FIXTURES / f'{name}_io.npz'))
  return meta, io


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_features(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  return model(images), model.features(images)


def logits_and_features(model, images_nhwc):
  """One jitted forward, compiled once per architecture and input shape (dispatching every op
  eagerly is much slower on CPU)."""
  return jax.tree.map(np.asarray, _logits_and_features(*nnx.split(model), images_nhwc))


def fixture_model(name, **overrides):
  """(model in eval mode, meta, io) of an official fixture, loaded through the strict low-level
  state-dict table (model overrides, e.g. an implementation switch, are passed to create_model)."""
  import torch  # pylint: disable=g-import-not-at-top
  import cvt_flax  # pylint: disable=g-import-not-at-top
  from cvt_flax.convert.official import load_official_state_dict  # pylint: disable=g-import-not-at-top
  meta, io = load_fixture(name)
  state_dict = {k: v.numpy() for k, v in
                torch.load(FIXTURES / f'{name}.pth', weights_only=True).items()}
  model = cvt_flax.create_model(meta['spec'], num_classes=meta['num_classes'], rngs=nnx.Rngs(0),
                                activation=meta['activation'], **overrides)
  load_official_state_dict(model, state_dict)
  model.eval()
  return model, meta, io
