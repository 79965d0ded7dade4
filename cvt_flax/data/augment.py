"""Image preprocessing ops in TensorFlow, with torchvision / timm semantics.

Every random op takes an explicit stateless seed (an int32/int64 tensor of shape [2]) and draws only
from `tf.random.stateless_*`, so the same seed gives the same result eagerly and inside `tf.data`.
Images between ops are float32 HxWx3 in 0-255 with integer values (as uint8 PIL images are in timm).
Normalisation and random erasing's noise happen on the device, in the train step; here random
erasing only draws its box (`erasing_box`).
"""
import math

import tensorflow as tf

from cvt_flax.preprocess import max_image_pixels, too_many_pixels

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its center-crop fallback.
ERASE_ATTEMPTS = 10


def split_seed(seed, num):
  """`num` independent seeds ([num, 2]) derived from one stateless seed."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


def quantize(image):
  """Rounds and clips to uint8 values (kept as float32), as a PIL image would store them."""
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _uniform(seed, shape, low, high):
  return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _randint(seed, shape, high):
  """Uniform integers in [0, high) for a per-element int32 `high` >= 1."""
  u = _uniform(seed, shape, 0.0, 1.0)
  return tf.minimum(tf.cast(tf.floor(u * tf.cast(high, tf.float32)), tf.int32), high - 1)


def random_resized_crop_box(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params: returns int32 (top, left, crop_h, crop_w).

  Up to 10 boxes with area fraction ~ U(scale) and log aspect ratio (w/h) ~ U(log ratio) are tried
  (vectorised; the first that fits wins); if none fits, a center crop clamped to the ratio range.
  """
  seeds = split_seed(seed, 4)
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = height_f * width_f * _uniform(seeds[0], [CROP_ATTEMPTS], scale[0], scale[1])
  aspect = tf.exp(_uniform(seeds[1], [CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  top = _randint(seeds[2], [CROP_ATTEMPTS], tf.maximum(height - crop_h + 1, 1))
  left = _randint(seeds[3], [CROP_ATTEMPTS], tf.maximum(width - crop_w + 1, 1))
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  in_ratio = width_f / height_f
  fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
  fallback = tf.stack([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w])
  sampled = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
  return tf.unstack(tf.where(tf.reduce_any(fits), sampled, fallback))


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _header_pixels(image_bytes):
  """Height * width as the header says, before anything is decoded: JPEG's frame header, PNG's
  IHDR chunk (big-endian width and height at bytes 16-23); 0 for other formats, which are small
  enough to decode as they are (ImageFolder reads .jpg, .jpeg and .png)."""
  def png():
    size = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 8), tf.uint8), tf.int64)
    width, height = tf.unstack(tf.reshape(size, [2, 4]) @ tf.constant([[2**24], [2**16], [2**8],
                                                                        [1]], tf.int64))
    return width[0] * height[0]

  def jpeg():
    return tf.reduce_prod(tf.image.extract_jpeg_shape(image_bytes, output_type=tf.int64)[:2])

  is_png = tf.logical_and(tf.strings.substr(image_bytes, 0, 8) == _PNG_SIGNATURE,
                          tf.strings.length(image_bytes) >= 24)
  return tf.case([(tf.io.is_jpeg(image_bytes), jpeg), (is_png, png)],
                 default=lambda: tf.constant(0, tf.int64))


def refuse_bombs(image_bytes):
  """`image_bytes`, once its header shows no more than `preprocess.max_image_pixels()` pixels: a
  small file can decode to gigabytes (a 30000 x 30000 PNG of 109 KB), so the size is checked before
  decoding. The failing example is named by `checks`."""
  limit = max_image_pixels()
  pixels = _header_pixels(image_bytes)
  check = tf.debugging.assert_less_equal(
      pixels, tf.constant(limit, tf.int64),
      message=too_many_pixels())
  with tf.control_dependencies([check]):
    return tf.identity(image_bytes)


def decode_any(image_bytes):
  """Any encoded image -> uint8 HxWx3. channels=3 turns grey (and RGBA) images into RGB, so
  1-channel datasets need no special case. JPEGs are decoded with the accurate integer DCT, which
  gives PIL's pixels exactly (TF's default fast DCT is up to 10 levels off)."""
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def resize(image, height, width):
  """One antialiased 2-D bicubic resize pass, quantised to uint8 values: the train crops' resize.
  It differs from PIL's two separable passes (with a uint8 image between them) only where bicubic
  overshoots at sharp edges; the eval transform is PIL's own (`Preprocess.pixels`)."""
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                            method='bicubic', antialias=True)
  return quantize(resized)


def decode_and_random_resized_crop(image_bytes, seed, size, scale=(0.08, 1.0),
                                   ratio=(3 / 4, 4 / 3)):
  """Decodes an encoded image and applies RandomResizedCrop to (size, size).

  JPEGs are decoded only inside the chosen window (`decode_and_crop_jpeg`), which is what makes the
  ImageNet pipeline fast; other formats (PNG, ...) are decoded fully, then cropped (`resize`). The
  window is one column wider on each side than the box: libjpeg upsamples chroma at a window's
  edge columns without their neighbours (up to 37 levels off a full decode); the box's own columns
  come out as a full decode (PIL's, timm's) gives them.
  """
  def from_jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    top, left, crop_h, crop_w = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
    wide_left = tf.maximum(left - 1, 0)
    wide_right = tf.minimum(left + crop_w + 1, shape[1])
    window = tf.stack([top, wide_left, crop_h, wide_right - wide_left])
    wide = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3,
                                         dct_method='INTEGER_ACCURATE')
    return wide[:, left - wide_left:left - wide_left + crop_w]

  def from_any():
    image = decode_any(image_bytes)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
    return image[top:top + crop_h, left:left + crop_w]

  image_bytes = refuse_bombs(image_bytes)
  crop = tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, from_any)
  image = resize(crop, size, size)
  image.set_shape([size, size, 3])
  return image


def random_flip(image, seed, prob=0.5):
  """Horizontal flip with probability `prob`."""
  flip = _uniform(seed, [], 0.0, 1.0) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def erasing_box(seed, height, width, prob=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
  """The box of timm's RandomErasing(mode='pixel', count=1) on a height x width image, as int32
  (top, left, box height, box width); all zeros for no erasing. The train step fills the box with
  per-pixel N(0, 1) noise on the normalised image (`cvt_flax.training.erasing`).

  With probability `prob`, up to 10 boxes (area fraction ~ U(area), log aspect ~ U(log aspect)) are
  tried; the first one strictly smaller than the image is taken.
  """
  seeds = split_seed(seed, 5)
  total = float(height * width)
  target = total * _uniform(seeds[0], [ERASE_ATTEMPTS], area[0], area[1])
  ratio = tf.exp(_uniform(seeds[1], [ERASE_ATTEMPTS], math.log(aspect[0]), math.log(aspect[1])))
  box_h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (box_w < width) & (box_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_h, box_w = box_h[first], box_w[first]
  top = _randint(seeds[2], [], height - box_h + 1)  # timm: random.randint(0, H - h), inclusive.
  left = _randint(seeds[3], [], width - box_w + 1)
  erase = (_uniform(seeds[4], [], 0.0, 1.0) < prob) & tf.reduce_any(fits)
  return tf.stack([top, left, box_h, box_w]) * tf.cast(erase, tf.int32)
