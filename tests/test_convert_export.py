"""Export to the official layout, and the `python -m cvt_flax.convert` command line."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cvt_flax
from cvt_flax.convert import load_pytorch, save_official
from helpers import DATA, ROOT, load_fixture, logits_and_features


@pytest.mark.parametrize('name', ['official_tiny', 'official_tiny_avg'])
def test_official_round_trip_is_exact(tmp_path, name):
  save_official(load_pytorch(DATA / f'{name}.pth', spec=DATA / f'{name}.json'),
                tmp_path / 'out.pth')
  before = torch.load(DATA / f'{name}.pth', weights_only=True)
  after = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert list(after) == list(before)  # same keys, in the official order
  for key, value in before.items():
    assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
    assert torch.equal(after[key], value), key  # incl. int64 num_batches_tracked


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'cvt_flax.convert', *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT)


def test_cli_converts_the_fixture_with_check(tmp_path):
  out = tmp_path / 'tiny'
  run = _convert(DATA / 'official_tiny.pth', out, '--spec', DATA / 'official_tiny.json',
                 '--check', '--check-size', 64)
  assert run.returncode == 0, run.stderr
  diff = float(re.search(r'max \|logit difference\| = (\S+)', run.stdout).group(1))
  assert diff < 1e-5
  meta, io = load_fixture('official_tiny')
  model = cvt_flax.load_checkpoint(out)
  assert model.config.num_classes == meta['num_classes']
  logits, _ = logits_and_features(model, io['input_1'].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, io['logits_1'], atol=1e-5, rtol=0)


def test_cli_reports_errors(tmp_path):
  run = _convert(DATA / 'official_tiny.pth', tmp_path / 'out')  # heads not inferable
  assert run.returncode == 2
  assert 'error:' in run.stderr and 'not a multiple of 64' in run.stderr
  assert not (tmp_path / 'out').exists()
