"""Shared test fixtures. The golden data lives in ../shared/fixtures (see its README)."""
import json
import os
import pathlib

import numpy as np
import pytest

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
