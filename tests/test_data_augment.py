"""Augmentation ops: PIL/torchvision/timm semantics, value ranges, and stateless determinism."""
import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cvt_flax.data import augment, pipeline, randaugment
from cvt_flax.data.config import default_input_config, with_eval_preprocess
from cvt_flax.preprocess import Preprocess
import tensorflow as tf

FILL = (124, 116, 104)  # timm's fill for the ImageNet mean.


def _natural_image(height=40, width=56, seed=0):
  """Smooth random content with the full 0-255 range (pure noise is not what images look like)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 4, width // 4, 3)).astype(np.uint8)
  smooth = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
  smooth = np.asarray(smooth.filter(ImageFilter.GaussianBlur(1))).astype(int)
  return np.clip(smooth * 3 // 2 - 40, 0, 255).astype(np.uint8)


def _solarize_add(image, addition, threshold=128):
  return image.point([min(255, i + addition) if i < threshold else i for i in range(256)] * 3)


def _pil_reference(image, name, magnitude, sign):
  """What timm's RandAugment op does to a PIL image at `magnitude` (its level_to_arg + PIL call)."""
  level = magnitude / 10
  factor = level * 1.8 + 0.1
  size = image.size
  bilinear = Image.BILINEAR
  shift = lambda m: image.transform(size, Image.AFFINE, m, resample=bilinear, fillcolor=FILL)
  ops = {
      'AutoContrast': lambda: ImageOps.autocontrast(image),
      'Equalize': lambda: ImageOps.equalize(image),
      'Invert': lambda: ImageOps.invert(image),
      'Posterize': lambda: ImageOps.posterize(image, int(level * 4)),
      'Solarize': lambda: ImageOps.solarize(image, int(level * 256)),
      'SolarizeAdd': lambda: _solarize_add(image, int(level * 110)),
      'Color': lambda: ImageEnhance.Color(image).enhance(factor),
      'Contrast': lambda: ImageEnhance.Contrast(image).enhance(factor),
      'Brightness': lambda: ImageEnhance.Brightness(image).enhance(factor),
      'Sharpness': lambda: ImageEnhance.Sharpness(image).enhance(factor),
      'Rotate': lambda: image.rotate(sign * level * 30, resample=bilinear, fillcolor=FILL),
      'ShearX': lambda: shift((1, sign * level * 0.3, 0, 0, 1, 0)),
      'ShearY': lambda: shift((1, 0, 0, sign * level * 0.3, 1, 0)),
      'TranslateXRel': lambda: shift((1, 0, sign * level * 0.45 * size[0], 0, 1, 0)),
      'TranslateYRel': lambda: shift((1, 0, 0, 0, 1, sign * level * 0.45 * size[1])),
  }
  return np.asarray(ops[name]()).astype(np.float32)


@pytest.mark.parametrize('name', randaugment.OP_NAMES)
def test_randaugment_op_matches_pil(name):
  image = _natural_image()
  for magnitude, sign in ((2.5, 1.0), (6.3, -1.0), (9.0, 1.0), (10.0, -1.0)):
    expected = _pil_reference(Image.fromarray(image), name, magnitude, sign)
    out = randaugment.apply_op(tf.constant(image, tf.float32), name, magnitude, sign, FILL).numpy()
    diff = np.abs(out - expected)
    # Within one level everywhere (float vs fixed-point rounding), and almost always exact.
    assert diff.max() <= 1, (name, magnitude, diff.max())
    assert diff.mean() < 0.1, (name, magnitude, diff.mean())


@pytest.mark.parametrize('name', ['AutoContrast', 'Equalize'])
def test_per_channel_ops_leave_flat_channels_as_pil_does(name):
  """A constant channel (PIL leaves it) beside a two-level one and a natural one: each channel's
  table is its own."""
  image = _natural_image()
  image[..., 1] = 77
  image[..., 2] = np.where(image[..., 2] > 128, 200, 30)
  expected = _pil_reference(Image.fromarray(image), name, 9.0, 1.0)
  out = randaugment.apply_op(tf.constant(image, tf.float32), name, 9.0, 1.0, FILL).numpy()
  np.testing.assert_array_equal(out[..., 1], 77)
  assert np.abs(out - expected).max() <= 1, name


@pytest.mark.parametrize('name', randaugment.OP_NAMES)
def test_randaugment_op_keeps_shape_dtype_range(name):
  image = tf.constant(_natural_image(17, 23, seed=1), tf.float32)  # Odd, non-square on purpose.
  for magnitude in (0.0, 5.0, 9.0, 10.0):
    out = randaugment.apply_op(image, name, magnitude, -1.0, FILL)
    assert out.shape == image.shape and out.dtype == tf.float32
    values = out.numpy()
    assert values.min() >= 0 and values.max() <= 255
    np.testing.assert_array_equal(values, np.round(values))  # Stays uint8-valued.


def test_posterize_zero_bits_is_black():
  # timm with an old PIL: magnitude < 2.5 keeps 0 bits (new PIL refuses bits=0).
  out = randaugment.apply_op(tf.constant(_natural_image(), tf.float32), 'Posterize', 1.0)
  assert np.all(out.numpy() == 0)


@pytest.mark.parametrize('mode', ['crop', 'warp'])
def test_eval_transform_is_timms_exactly(mode):
  image = _natural_image(75, 100, seed=3)
  pil = Image.fromarray(image)
  if mode == 'warp':
    expected = pil.resize((64, 64), Image.BICUBIC)
  else:  # timm: Resize(floor(64 / 0.875)) on the shorter side, CenterCrop(64).
    short = math.floor(64 / 0.875)
    resized = pil.resize((int(short * 100 / 75), short), Image.BICUBIC)
    top = int(round((resized.size[1] - 64) / 2))
    left = int(round((resized.size[0] - 64) / 2))
    expected = resized.crop((left, top, left + 64, top + 64))
  cfg = default_input_config()
  with_eval_preprocess(cfg, Preprocess(64, mode))
  out = pipeline.eval_transform(cfg, tf.io.encode_png(image)).numpy()
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.asarray(expected))  # the same PIL calls


def _boxes(height, width, scale, ratio, num):
  return np.array([[int(v) for v in augment.random_resized_crop_box(
      tf.constant([7, i]), height, width, scale, ratio)] for i in range(num)])


def test_random_resized_crop_boxes_respect_bounds():
  height, width = 300, 400
  boxes = _boxes(height, width, (0.08, 1.0), (3 / 4, 4 / 3), 300)
  top, left, crop_h, crop_w = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (top + crop_h <= height) & (left + crop_w <= width))
  # Sides are rounded, so area and ratio may pass their bounds by half a pixel's worth.
  area = crop_h * crop_w / (height * width)
  assert area.min() >= 0.08 * (1 - 2 * 0.5 / math.sqrt(0.08 * 0.75 * height * width))
  assert area.max() <= 1.0
  ratio = crop_w / crop_h
  assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
  assert len({tuple(b) for b in boxes}) > 250  # Random, not a constant box.
  assert area.max() - area.min() > 0.5


@pytest.mark.parametrize('subsampling', [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_jpeg_crop_window_decodes_as_the_whole_image(subsampling):
  # The JPEG path decodes only the crop's window; the PNG path decodes everything, then crops. Given
  # the same pixels (the JPEG's, as PIL decodes them), both must give the same crops.
  buffer = io.BytesIO()
  Image.fromarray(_natural_image(75, 100, seed=5)).save(buffer, format='JPEG', quality=90,
                                                        subsampling=subsampling)
  jpeg = buffer.getvalue()
  png = tf.io.encode_png(np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB')))
  for i in range(8):
    seed = tf.constant([3, i])
    np.testing.assert_array_equal(augment.decode_and_random_resized_crop(jpeg, seed, 32),
                                  augment.decode_and_random_resized_crop(png, seed, 32),
                                  err_msg=f'box {i}')


def test_random_resized_crop_falls_back_to_center_crop_like_torchvision():
  # No box with area >= 90% fits a 10x1000 image at ratio <= 4/3: torchvision's fallback clamps the
  # whole image to the largest allowed ratio and centres it.
  for top, left, crop_h, crop_w in _boxes(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), 5):
    assert (top, left, crop_h, crop_w) == (0, (1000 - 13) // 2, 10, round(10 * 4 / 3))
  for top, left, crop_h, crop_w in _boxes(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), 5):
    assert (top, left, crop_h, crop_w) == ((1000 - 13) // 2, 0, round(10 / (3 / 4)), 10)


def test_random_erasing_boxes_as_timm_draws_them():
  fractions = []
  for i in range(40):
    top, left, height, width = augment.erasing_box(tf.constant([3, i]), 64, 48, prob=1.0).numpy()
    if height:
      assert top >= 0 and left >= 0 and top + height <= 64 and left + width <= 48
      fractions.append(height * width / (64 * 48))
  assert len(fractions) >= 35  # With prob 1 a box fits almost always on 64x48.
  assert min(fractions) >= 0.015 and max(fractions) <= 1 / 3 + 0.03
  never = [augment.erasing_box(tf.constant([3, i]), 64, 48, prob=0.0).numpy() for i in range(5)]
  np.testing.assert_array_equal(never, 0)


def _augment_everything(image_bytes, seed):
  cfg = default_input_config()
  cfg.image_size = 24
  cfg.random_erasing = 1.0
  cfg.randaugment_num_ops = 3
  out = pipeline.train_transform(cfg, image_bytes, seed)
  return tf.concat([tf.reshape(tf.cast(out['image'], tf.int32), [-1]), out['erase']], axis=0)


@pytest.mark.parametrize('encode', [tf.io.encode_png, tf.io.encode_jpeg])
def test_ops_agree_eagerly_and_inside_tf_data(encode):
  image_bytes = encode(tf.constant(_natural_image(37, 53, seed=4)))
  seeds = tf.constant([[1, 2], [3, 4], [5, 6], [7, 8]], tf.int64)
  def resized(b):
    return augment.decode_and_random_resized_crop(b, tf.constant([0, 0]), 24, scale=(1.0, 1.0))

  fns = {
      'crop': lambda b, s: augment.decode_and_random_resized_crop(b, s, 24),
      'flip': lambda b, s: augment.random_flip(resized(b), s),
      'randaugment': lambda b, s: randaugment.rand_augment(resized(b), s, 4, 9.0, 0.5, FILL),
      'erasing': lambda b, s: augment.erasing_box(s, 24, 24, 1.0),
      'train_transform': _augment_everything,
  }
  for name, fn in fns.items():
    eager = [fn(image_bytes, seed).numpy() for seed in seeds]
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s, fn=fn: fn(image_bytes, s),
                                                       num_parallel_calls=2)
    for expected, got in zip(eager, ds.as_numpy_iterator()):
      np.testing.assert_array_equal(got, expected, err_msg=name)
    assert any(not np.array_equal(eager[0], e) for e in eager[1:]), f'{name}: seed has no effect'
