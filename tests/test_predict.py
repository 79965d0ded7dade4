"""The inference command: any image mode and size, JSON output, clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

import cvt_flax
from cvt_flax import predict
from conftest import FIXTURES, load_fixture


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """The official fixture converted to a cvt-flax model checkpoint."""
  path = tmp_path_factory.mktemp('ckpt') / 'tiny'
  meta, _ = load_fixture('official_tiny')
  model = cvt_flax.load_pytorch(str(FIXTURES / 'official_tiny.pth'), spec=meta['spec'])
  cvt_flax.save_model(model, str(path))
  return str(path)


def _images(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
  paths = {
      'rgb.jpg': Image.fromarray(rgb),
      'gray.png': Image.fromarray(rgb[..., 0]),
      'rgba.png': Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (90, 130), np.uint8)])),
      'cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
      'tiny.png': Image.fromarray(rgb[:5, :3]),
  }
  out = []
  for name, img in paths.items():
    img.save(tmp_path / name)
    out.append(str(tmp_path / name))
  return out


def test_predict_json_for_all_image_modes(checkpoint, tmp_path, capsys):
  paths = _images(tmp_path)
  assert predict.main(['--checkpoint', checkpoint, '--image-size', '64', '--top-k', '3', '--json',
                       *paths]) == 0
  results = json.loads(capsys.readouterr().out)
  assert [r['image'] for r in results] == paths
  model = cvt_flax.load_checkpoint(checkpoint)
  for r in results:
    probs = [e['prob'] for e in r['top_k']]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert all(e['label'] == str(e['index']) for e in r['top_k'])  # 10 classes: no names
    # The command's answer is the model's answer on the same preprocessing.
    x = predict.preprocess(predict.load_image(r['image']), 64)[None]
    logits = np.asarray(model(x))[0]
    assert r['top_k'][0]['index'] == int(np.argmax(logits))


def test_preprocess_crop_and_warp():
  img = Image.fromarray(np.zeros((300, 500, 3), np.uint8))
  assert predict.preprocess(img, 224).shape == (224, 224, 3)
  assert predict.preprocess(img, 384).shape == (384, 384, 3)
  assert predict.class_names(1000)[0].startswith('tench')


def test_unreadable_files_are_named(checkpoint, tmp_path, capsys):
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not an image')
  truncated = tmp_path / 'cut.jpg'
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:100])
  for path, message in [(bad, 'not a readable image'), (truncated, 'corrupt or truncated'),
                        (tmp_path / 'missing.png', 'no such file')]:
    assert predict.main(['--checkpoint', checkpoint, str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
  assert predict.main(['--checkpoint', str(tmp_path / 'nope'), str(bad)]) == 2
