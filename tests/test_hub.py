"""Released weights by hub name, offline: `from_pretrained` and `predict` read a hub cache laid out
as huggingface_hub lays it out (conftest's `hub_cache`), and a name that is neither cached nor
reachable gets one clear error."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cvt_flax
from cvt_flax import preprocess
from cvt_flax.io import HubError, hub
from helpers import (HUB_LABELS, PARITY_ATOL, ROOT, hf_probabilities, logits_and_features,
                     photos, subprocess_env)


@pytest.fixture
def offline(monkeypatch, hub_cache):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', hub_cache['cache_dir'])
  return hub_cache


def test_hub_names_are_told_from_paths():
  assert hub.parse_hub_name('microsoft/cvt-13') == ('microsoft/cvt-13', None)
  assert hub.parse_hub_name('microsoft/cvt-13@refs/pr/1') == ('microsoft/cvt-13', 'refs/pr/1')
  for not_a_name in ('cvt13', '/abs/path', './runs/digits', 'a/b/c', 'CvT-13-224x224-IN-1k.pth'):
    assert hub.parse_hub_name(not_a_name) is None


def test_from_pretrained_reads_the_offline_cache(offline):
  model = cvt_flax.from_pretrained('microsoft/cvt-13', cache_dir=offline['cache_dir'])
  assert model.class_names == HUB_LABELS  # HF's id2label
  assert model.preprocess == preprocess.from_hf_processor(offline['processor'].to_dict())
  assert model.config.activation == 'gelu'
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 48)).astype(np.float32)
  with torch.no_grad():
    want = offline['model'](pixel_values=torch.from_numpy(x)).logits.numpy()
  logits, _ = logits_and_features(model, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, want, atol=PARITY_ATOL, rtol=0)  # framework vs framework
  # A pinned revision, and the cache found through HF_HUB_CACHE alone.
  pinned = cvt_flax.from_pretrained(f'microsoft/cvt-13@{offline["commit"]}')
  assert pinned.class_names == HUB_LABELS


def test_unknown_name_offline_is_one_clear_error(offline):
  with pytest.raises(HubError, match=r'microsoft/cvt-99: not in the local hub cache \(.*\) and '
                                     r'offline \(HF_HUB_OFFLINE=1'):
    cvt_flax.from_pretrained('microsoft/cvt-99')
  with pytest.raises(FileNotFoundError, match='not a hub name'):
    cvt_flax.from_pretrained('no-such-checkpoint.pth')


def test_a_local_path_wins_over_a_hub_name(offline, tmp_path, monkeypatch, fixtures_dir):
  local = tmp_path / 'microsoft' / 'cvt-13'
  local.parent.mkdir()
  cvt_flax.save_model(cvt_flax.load_pytorch(fixtures_dir / 'official_tiny.pth',
                                            spec=fixtures_dir / 'official_tiny.json'), local)
  monkeypatch.chdir(tmp_path)
  assert cvt_flax.from_pretrained('microsoft/cvt-13').config.num_classes == 10  # not the hub's 5


def test_predict_by_hub_name_prints_its_labels_and_hf_probabilities(offline, tmp_path):
  paths = photos(tmp_path / 'photos')
  env = subprocess_env({'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': offline['cache_dir']})
  proc = subprocess.run([sys.executable, '-m', 'cvt_flax.predict', '--checkpoint',
                         'microsoft/cvt-13', '--top-k', '5', '--json', *map(str, paths)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  want = hf_probabilities(offline['model'], offline['processor'],
                          [np.asarray(Image.open(p).convert('RGB')) for p in paths])
  for result, hf in zip(results, want):
    assert [e['label'] for e in result['top_k']] == [HUB_LABELS[e['index']]
                                                     for e in result['top_k']]
    got = np.zeros(len(HUB_LABELS))
    got[[e['index'] for e in result['top_k']]] = [e['prob'] for e in result['top_k']]
    np.testing.assert_allclose(got, hf, atol=2e-3)  # measured: ~1e-6 (the same PIL pixels)
    assert result['top_k'][0]['index'] == int(np.argmax(hf))


def test_predict_of_an_unknown_hub_name_offline_fails_clearly(offline, tmp_path):
  image = photos(tmp_path / 'photos')[0]
  env = subprocess_env({'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': offline['cache_dir']})
  proc = subprocess.run([sys.executable, '-m', 'cvt_flax.predict', '--checkpoint',
                         'microsoft/cvt-99', str(image)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and 'microsoft/cvt-99: not in the local hub cache' in proc.stderr
