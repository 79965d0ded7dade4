"""timm's RandAugment ('rand-m9-mstd0.5') as TensorFlow ops on float32 0-255 HxWx3 images.

Each of `num_ops` rounds picks one of the 15 ops below uniformly (with replacement) and applies it
with probability 0.5, at magnitude ~ N(magnitude, mstd) clipped to [0, 10]. Signed ops (rotate,
shear, translate) flip the sign with probability 0.5. The op implementations follow PIL (which timm
calls): point ops are exact, geometric ops use bilinear sampling and fill with the mean colour.

Speed (benchmarks/RESULTS.md has each op's cost per image against a decode): selects use `Select`
on operands of equal shape (TF's broadcasting `SelectV2`, behind `tf.where`, is an order of
magnitude slower on images); per-channel reductions run over contiguous rows; Equalize's three
tables are one histogram and one gather; luma is float32 arithmetic (exact); translations move
whole rows, shears resample each row with `crop_and_resize`, and only rotation takes TF's
general projective transform. Not XLA: an XLA-compiled op runs fast alone, but called from
RandAugment's `tf.switch_case` inside tf.data it was compiled again and again (tens of ms per
image).
"""
import functools
import math

import tensorflow as tf

from cvt_flax.data.augment import quantize, split_seed

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the strongest setting.
APPLY_PROB = 0.5  # timm's rand_augment_ops use AugmentOp(prob=0.5).


def select(condition, x, y):
  """`tf.where(condition, x, y)` with every operand broadcast to the result's shape first."""
  shape = tf.broadcast_dynamic_shape(tf.broadcast_dynamic_shape(tf.shape(condition), tf.shape(x)),
                                     tf.shape(y))
  return tf.raw_ops.Select(condition=tf.broadcast_to(condition, shape), x=tf.broadcast_to(x, shape),
                           y=tf.broadcast_to(y, shape))


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): truncated towards zero, clipped to 0-255."""
  return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image):
  """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point with rounding), HxWx1. Exact in
  float32: every product and partial sum is an integer below 2**24, and / 65536 is exact."""
  luma = image[..., 0] * 19595.0 + image[..., 1] * 38470.0 + image[..., 2] * 7471.0
  return tf.floor((luma + 32768.0) / 65536.0)[..., None]


def _channels_first(image):
  """(C, H * W): per-channel reductions over contiguous rows, several times faster in TF than
  reducing an HxWxC image over its first two axes."""
  return tf.transpose(tf.reshape(image, [-1, image.shape[-1]]))


def auto_contrast(image, _):
  """PIL ImageOps.autocontrast: stretch each channel to the full 0-255 range (a flat channel is
  left as it is: low 0, scale 1)."""
  channels = _channels_first(image)
  low, high = tf.reduce_min(channels, axis=1), tf.reduce_max(channels, axis=1)
  flat = high <= low
  low = tf.where(flat, 0.0, low)
  scale = tf.where(flat, 1.0, 255.0 / tf.maximum(high - low, 1.0))
  return tf.clip_by_value(tf.floor((image - low) * scale), 0.0, 255.0)


def equalize(image, _):
  """PIL ImageOps.equalize, per channel: the three histograms as one of 3 x 256 bins (each pixel
  offset by 256 times its channel), and the three lookup tables applied by one gather."""
  channels = image.shape[-1]
  values = tf.cast(image, tf.int32)
  bins = values + 256 * tf.range(channels)
  histogram = tf.reshape(tf.math.bincount(tf.reshape(bins, [-1]), minlength=256 * channels,
                                          maxlength=256 * channels), [channels, 256])
  levels = tf.range(256)
  last = tf.reduce_max(levels * tf.cast(histogram > 0, tf.int32), axis=1)  # last non-empty bin
  step = (tf.reduce_sum(histogram, axis=1) - tf.gather(histogram, last, batch_dims=1)) // 256
  step = step[:, None]
  lut = (step // 2 + tf.cumsum(histogram, axis=1, exclusive=True)) // tf.maximum(step, 1)
  lut = tf.where(step > 0, tf.minimum(lut, 255), levels)  # PIL leaves such a channel as it is.
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), tf.float32)


def invert(image, _):
  return 255.0 - image


def posterize(image, bits):
  """Keeps the `bits` most significant bits (0 bits -> black, as PIL does)."""
  divisor = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
  return tf.floor(image / divisor) * divisor


def solarize(image, threshold):
  return select(image >= tf.cast(threshold, tf.float32), 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  added = tf.minimum(image + tf.cast(addition, tf.float32), 255.0)
  return select(image < threshold, added, image)


def color(image, factor):
  return _blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)  # PIL: int(ImageStat mean + 0.5).
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border pixels unfiltered).
  The 3x3 filter is a sum of nine shifted views."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  window = [image[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3)]
  smooth = (tf.add_n(window) + 4.0 * window[4]) / 13.0
  smooth = tf.pad(quantize(smooth), [[1, 1], [1, 1], [0, 0]])
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
  return _blend(select(border, image, smooth), image, factor)


def affine(image, matrix, fill):
  """PIL Image.transform(AFFINE, matrix, BILINEAR, fillcolor=fill) for matrix (a, b, c, d, e, f):
  output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f) in PIL's coordinates, where
  pixel i spans [i, i + 1). As in PIL, a sample point inside the image is interpolated with edge
  pixels replicated, and one outside it takes the fill colour."""
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # PIL maps pixel centres (x + 0.5); TF maps pixel indices.
  transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
  shape = tf.shape(image)
  sampled = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=shape[:2], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='NEAREST')[0]
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  x = tf.range(width)[None, :] + 0.5
  y = tf.range(height)[:, None] + 0.5
  x_in, y_in = a * x + b * y + c, d * x + e * y + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  return _inside_or_fill(inside[..., None], sampled, fill)


def _inside_or_fill(inside, sampled, fill):
  """The geometric ops' output as PIL writes it: the interpolated value truncated where the sample
  point lies inside the image (`inside` broadcasts against `sampled`), `fill` elsewhere."""
  return tf.floor(select(inside, sampled, tf.constant(fill, tf.float32)))


def rotate(image, degrees, fill):
  """PIL Image.rotate(degrees): counter-clockwise about the image centre."""
  shape = tf.cast(tf.shape(image), tf.float32)
  center_x, center_y = shape[1] / 2.0, shape[0] / 2.0
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  matrix = (cos, sin, center_x - cos * center_x - sin * center_y,
            -sin, cos, center_y + sin * center_x - cos * center_y)
  return affine(image, matrix, fill)


def _shift_rows(image, shifts, fill):
  """PIL's AFFINE transform for a matrix (1, b, c, 0, 1, 0): output row y samples input row y at
  x + shifts[y] (pixel i at i), bilinearly, with edge pixels replicated inside the image and `fill`
  outside it. Each row is an image of its own to `crop_and_resize`, whose one box per row samples
  it on a regular grid (no gather); the edge-padded row makes the replication exact."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  padded = tf.pad(image, [[0, 0], [1, 1], [0, 0]], mode='SYMMETRIC')[:, None]  # (H, 1, W + 2, C)
  span = tf.cast(width + 1, tf.float32)  # crop_and_resize's x scale: last padded column
  start = (1.0 + shifts) / span
  end = (tf.cast(width, tf.float32) + shifts) / span
  zeros = tf.zeros_like(shifts)
  boxes = tf.stack([zeros, start, zeros, end], axis=1)
  rows = tf.image.crop_and_resize(padded, boxes, tf.range(height), tf.stack([1, width]))
  sampled = tf.reshape(rows, tf.shape(image))
  position = tf.range(tf.cast(width, tf.float32))[None, :] + shifts[:, None]
  inside = (position >= -0.5) & (position < tf.cast(width, tf.float32) - 0.5)
  return _inside_or_fill(inside[..., None], sampled, fill)


def _transposed(op, image, *args):
  """`op` along the other axis: on the transposed image, transposed back."""
  return tf.transpose(op(tf.transpose(image, [1, 0, 2]), *args), [1, 0, 2])


def _sheared_shifts(image, factor):
  """Per-row shifts of matrix (1, factor, 0, 0, 1, 0) in pixel-index coordinates: PIL samples
  x + 0.5 + factor (y + 0.5) for the pixel centred at x + 0.5."""
  rows = tf.range(tf.cast(tf.shape(image)[0], tf.float32))
  return tf.cast(factor, tf.float32) * (rows + 0.5)


def shear_x(image, factor, fill):
  return _shift_rows(image, _sheared_shifts(image, factor), fill)


def shear_y(image, factor, fill):
  return _transposed(lambda t: _shift_rows(t, _sheared_shifts(t, factor), fill), image)


def _shift_all_rows(image, shift, fill):
  """PIL's AFFINE transform for (1, 0, 0, 0, 1, shift): output row y samples input row y + shift,
  bilinearly between two whole rows (a gather of rows is a copy each), edge rows replicated inside
  the image and `fill` outside it."""
  height = tf.shape(image)[0]
  position = tf.range(tf.cast(height, tf.float32)) + tf.cast(shift, tf.float32)
  lower = tf.floor(position)
  above = tf.clip_by_value(tf.cast(lower, tf.int32), 0, height - 1)
  below = tf.clip_by_value(tf.cast(lower, tf.int32) + 1, 0, height - 1)
  weight = (position - lower)[:, None, None]
  sampled = tf.gather(image, above) * (1.0 - weight) + tf.gather(image, below) * weight
  inside = (position >= -0.5) & (position < tf.cast(height, tf.float32) - 0.5)
  return _inside_or_fill(inside[:, None, None], sampled, fill)


def translate_x_rel(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _transposed(_shift_all_rows, image, pixels, fill)


def translate_y_rel(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _shift_all_rows(image, pixels, fill)


# timm's level -> argument mappings (magnitude m in [0, 10]; `sign` is +1 or -1).
def _enhance_arg(m, _):
  return m / MAX_LEVEL * 1.8 + 0.1


def _signed(scale):
  return lambda m, sign: sign * m / MAX_LEVEL * scale


def _floored(scale):
  return lambda m, _: tf.floor(m / MAX_LEVEL * scale)


# name -> (op(image, arg, fill) -> image, level_to_arg(magnitude, sign)); timm's _RAND_TRANSFORMS.
_GEOMETRIC = {'Rotate': (rotate, _signed(30.0)),
              'ShearX': (shear_x, _signed(0.3)),
              'ShearY': (shear_y, _signed(0.3)),
              'TranslateXRel': (translate_x_rel, _signed(0.45)),
              'TranslateYRel': (translate_y_rel, _signed(0.45))}
_COLOUR = {'AutoContrast': (auto_contrast, lambda m, s: 0.0),
           'Equalize': (equalize, lambda m, s: 0.0),
           'Invert': (invert, lambda m, s: 0.0),
           'Posterize': (posterize, _floored(4.0)),
           'Solarize': (solarize, _floored(256.0)),
           'SolarizeAdd': (solarize_add, _floored(110.0)),
           'Color': (color, _enhance_arg),
           'Contrast': (contrast, _enhance_arg),
           'Brightness': (brightness, _enhance_arg),
           'Sharpness': (sharpness, _enhance_arg)}
OP_NAMES = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
            'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
            'TranslateYRel')


def apply_op(image, name, magnitude, sign=1.0, fill=(128, 128, 128)):
  """Applies RandAugment op `name` at `magnitude` (0-10) with sign +1/-1 (for signed ops)."""
  magnitude = tf.cast(magnitude, tf.float32)
  sign = tf.cast(sign, tf.float32)
  if name in _GEOMETRIC:
    op, level_to_arg = _GEOMETRIC[name]
    return op(image, level_to_arg(magnitude, sign), fill)
  op, level_to_arg = _COLOUR[name]
  return op(image, level_to_arg(magnitude, sign))


def rand_augment(image, seed, num_ops=2, magnitude=9.0, magnitude_std=0.5, fill=(128, 128, 128)):
  """timm RandAugment: `num_ops` rounds of (random op, p=0.5, noisy magnitude, random sign); the
  draws of all rounds at once (per-op TF overhead counts at this size)."""
  seeds = split_seed(seed, 3)
  indices = tf.random.stateless_uniform([num_ops], seeds[0], 0, len(OP_NAMES), dtype=tf.int32)
  apply, flip = tf.unstack(tf.random.stateless_uniform([2, num_ops], seeds[1]))
  noisy = magnitude + magnitude_std * tf.random.stateless_normal([num_ops], seeds[2])
  levels = tf.clip_by_value(noisy if magnitude_std > 0 else tf.fill([num_ops], magnitude), 0.0,
                            MAX_LEVEL)
  signs = 1.0 - 2.0 * tf.cast(flip > 0.5, tf.float32)
  skip = len(OP_NAMES)  # the last branch leaves the image as it is: one control-flow op a round
  chosen = select(apply < APPLY_PROB, indices, skip)
  for i in range(num_ops):
    branches = [functools.partial(apply_op, image, name, levels[i], signs[i], fill)
                for name in OP_NAMES]
    image = tf.switch_case(chosen[i], branches + [lambda image=image: image])
  return image
