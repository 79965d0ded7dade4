"""The inference command: any image mode and size, the checkpoint's own preprocessing and class
names, one compile per input size, JSON output, clear errors."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

import cvt_flax
from cvt_flax import predict
from cvt_flax.io import FormatNote
from cvt_flax.preprocess import Preprocess, load_image
from helpers import DATA, exit_status, logits_and_features, png_bomb


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """The official fixture converted to a model directory, with a 64 px eval and class names."""
  path = tmp_path_factory.mktemp('ckpt') / 'tiny'
  model = cvt_flax.load_pytorch(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')
  cvt_flax.save_model(model, path, preprocess=Preprocess(64),
                      class_names=[f'class {i}' for i in range(10)])
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


def test_predict_json_for_all_image_modes_with_the_checkpoints_preprocessing(checkpoint, tmp_path,
                                                                            capsys):
  paths = _images(tmp_path)
  assert predict.main(['--checkpoint', checkpoint, '--top-k', '3', '--json', *paths]) == 0
  results = json.loads(capsys.readouterr().out)
  assert [r['image'] for r in results] == paths
  model = cvt_flax.load_checkpoint(checkpoint)
  for r in results:
    probs = [e['prob'] for e in r['top_k']]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert all(e['label'] == f"class {e['index']}" for e in r['top_k'])  # the saved names
    # The command's answer is the model's answer on the checkpoint's preprocessing (64 px crop).
    logits = logits_and_features(model, Preprocess(64)(load_image(r['image']))[None])[0][0]
    assert r['top_k'][0]['index'] == int(np.argmax(logits))
    assert r['top_k'][0]['prob'] == pytest.approx(float(np.max(np.exp(logits) / np.exp(logits).sum())),
                                                  abs=1e-5)


def test_flags_override_the_recorded_preprocessing(checkpoint, tmp_path, capsys):
  image = _images(tmp_path)[0]
  assert predict.main(['--checkpoint', checkpoint, '--image-size', '48', '--resize', 'warp',
                       '--json', image]) == 0
  top = json.loads(capsys.readouterr().out)[0]['top_k'][0]
  model = cvt_flax.load_checkpoint(checkpoint)
  logits = logits_and_features(model, Preprocess(48, 'warp')(load_image(image))[None])[0][0]
  assert top['index'] == int(np.argmax(logits))


def test_one_compile_per_input_size(checkpoint):
  model = cvt_flax.load_checkpoint(checkpoint)
  predict._probabilities().clear_cache()  # pylint: disable=protected-access
  for n in (1, 3, 9, 17):  # 1, 1, 2 and 3 batches of 8
    predict.predict(model, np.zeros((n, 64, 64, 3), np.float32))
  assert predict._probabilities()._cache_size() == 1  # pylint: disable=protected-access
  predict.predict(model, np.zeros((2, 48, 48, 3), np.float32))
  assert predict._probabilities()._cache_size() == 2  # pylint: disable=protected-access


def test_version_1_directory_predicts_as_before(fixtures_dir, tmp_path, capsys):
  """Format 1 recorded no preprocessing: predict used the official 224 px crop, as it does now."""
  image = _images(tmp_path)[0]
  with warnings.catch_warnings():
    warnings.simplefilter('error', FormatNote)
    with pytest.raises(FormatNote):
      cvt_flax.load_checkpoint(fixtures_dir / 'v1_official_tiny')
  assert predict.main(['--checkpoint', str(fixtures_dir / 'v1_official_tiny'), '--json',
                       image]) == 0
  top = json.loads(capsys.readouterr().out)[0]['top_k']
  model = cvt_flax.load_pytorch(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')
  logits = logits_and_features(model, Preprocess(224)(load_image(image))[None])[0][0]
  assert [e['index'] for e in top] == list(np.argsort(-logits)[:5])
  assert all(e['label'] == str(e['index']) for e in top)  # 10 classes: indices


def test_unreadable_files_are_named(checkpoint, tmp_path, capsys):
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not an image')
  truncated = tmp_path / 'cut.jpg'
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:100])
  for path, message in [(bad, 'not a readable image'), (truncated, 'corrupt or truncated'),
                        (tmp_path / 'missing.png', 'no such file')]:
    assert exit_status(predict.main, ['--checkpoint', checkpoint, str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
  assert exit_status(predict.main, ['--checkpoint', str(tmp_path / 'nope'), str(bad)]) == 2


def test_decompression_bomb_is_one_line_and_a_trusted_one_can_be_allowed(checkpoint, tmp_path,
                                                                         capsys, monkeypatch):
  bomb = tmp_path / 'bomb.png'
  bomb.write_bytes(png_bomb())  # 30000 x 30000
  assert exit_status(predict.main, ['--checkpoint', checkpoint, str(bomb)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith(f'error: {bomb}: image of 900,000,000 pixels, '
                                                 'more than the 178,956,970 allowed')
  assert 'PIL.Image.MAX_IMAGE_PIXELS' in err and '--max-image-pixels N' in err
  # Trusted: allowed through the flag (PIL's limit is process-wide: restored after the test).
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)
  large = tmp_path / 'large.png'
  Image.new('RGB', (120, 100)).save(large)
  cvt_flax.preprocess.set_max_image_pixels(10_000)
  with pytest.raises(cvt_flax.preprocess.ImageError, match='12,000 pixels, more than the 10,000'):
    load_image(large)
  assert predict.main(['--checkpoint', checkpoint, '--max-image-pixels', '12000', str(large)]) == 0
