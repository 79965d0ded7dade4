"""The eval transform a model expects: its definition, its geometry, and its PIL implementation.

`Preprocess` is the one definition and this module its one implementation, in PIL: predict calls
it (`Preprocess.__call__`), and so does the eval input pipeline on each decoded image inside
tf.data (`Preprocess.pixels`), which sends the uint8 pixels to the eval step to normalise on the
device. Predict, `evaluate` and HF's processors see the same pixels.

  resize='crop': resize the shorter side to int(image_size / crop_pct) (the longer side scaled and
                 truncated, as torchvision's Resize(int) and HF's processors do), then take the
                 centre image_size x image_size crop;
  resize='warp': resize straight to image_size x image_size (the official 384 models' eval);
  then x / 255, minus mean, over std (per channel, 0-1 units).

The centre crop's offset of an odd margin is where libraries differ: torchvision (the official CvT
evaluation, timm) rounds half to even (`crop_offset='round'`), HF's image processors floor
(`'floor'`). Each source keeps its own, so a converted model sees exactly the pixels its reference
pipeline would give it.

The pixels are the installed Pillow's. Pillow 13 (which `make install` pins) resizes in the
other order from Pillow 12 and older (vertical pass first) where the height loses more than twice
as many pixels as the width, which moves pixels by up to a few grey levels: a reference computed
with another Pillow can differ by that much.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping

import numpy as np

from cvt_flax.errors import CvtFlaxError

RESIZE_MODES = ('crop', 'warp')
INTERPOLATIONS = ('bicubic', 'bilinear')
CROP_OFFSETS = ('round', 'floor')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official CvT models are evaluated with a centre crop below this size and warped at it.
OFFICIAL_WARP_FROM = 384
_HF_RESAMPLE = {2: 'bilinear', 3: 'bicubic'}  # PIL's resampling codes in preprocessor_config.json


class PreprocessError(CvtFlaxError, ValueError):
  """A preprocessing record or option is invalid; the message names the field."""


class ImageError(CvtFlaxError, ValueError):
  """An input image could not be read; the message names the file."""


def _floor_half(margin):
  return margin // 2


def _round_half_even(margin):
  """round(margin / 2) for an integer margin, half to even as Python's and torchvision's round."""
  return round(margin / 2)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How an image becomes the model's input (see the module docstring)."""
  image_size: int = 224
  resize: str = 'crop'
  crop_pct: float = 0.875
  interpolation: str = 'bicubic'
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  crop_offset: str = 'round'

  def __post_init__(self):
    object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
    object.__setattr__(self, 'std', tuple(float(s) for s in self.std))
    self._validate()

  def _validate(self):
    def fail(field, why):
      raise PreprocessError(f'preprocess.{field}={getattr(self, field)!r}: {why}')
    if not isinstance(self.image_size, int) or self.image_size <= 0:
      fail('image_size', 'must be a positive integer')
    for field, allowed in (('resize', RESIZE_MODES), ('interpolation', INTERPOLATIONS),
                           ('crop_offset', CROP_OFFSETS)):
      if getattr(self, field) not in allowed:
        fail(field, f'must be one of {allowed}')
    if not 0 < self.crop_pct <= 1:
      fail('crop_pct', 'must be in (0, 1]')
    if len(self.mean) != 3 or len(self.std) != 3:
      fail('mean' if len(self.mean) != 3 else 'std', 'needs one value per RGB channel')
    if min(self.std) <= 0:
      fail('std', 'must be positive')

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], source: str = 'preprocess') -> 'Preprocess':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise PreprocessError(f'{source}: unknown preprocess fields {unknown}; known: {sorted(known)}.')
    try:
      return cls(**fields)
    except (TypeError, PreprocessError) as e:
      raise PreprocessError(f'{source}: {e}') from e

  def replace(self, **changes) -> 'Preprocess':
    """A copy with `changes` (None values are ignored: unset command-line flags)."""
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

  @property
  def resize_shorter_side(self) -> int:
    return int(self.image_size / self.crop_pct)

  def geometry(self, height: int, width: int):
    """(resized height, resized width, crop top, crop left) for a height x width image. For
    'warp' the crop is the whole resized image."""
    size = self.image_size
    if self.resize == 'warp':
      return size, size, 0, 0
    short = self.resize_shorter_side
    # The shorter side becomes `short`, the longer one short * long // shorter (truncated).
    new_h = max(short, short * height // width)
    new_w = max(short, short * width // height)
    offset = _round_half_even if self.crop_offset == 'round' else _floor_half
    return new_h, new_w, offset(new_h - size), offset(new_w - size)

  def __call__(self, image) -> np.ndarray:
    """A PIL image (any mode) or an HxWx3 uint8 array -> normalised float32 (S, S, 3)."""
    return self.normalize(self.pixels(image).astype(np.float32))

  def pixels(self, image) -> np.ndarray:
    """A PIL image (any mode) or an HxWx3 uint8 array -> the resized and cropped RGB pixels, uint8
    (S, S, 3), not normalised: what predict and the eval input pipeline feed the model.

    Any mode becomes RGB as PIL's convert('RGB') makes it (alpha dropped, as torchvision and HF's
    processors do)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if isinstance(image, np.ndarray):
      image = Image.fromarray(image)
    if image.mode != 'RGB':
      image = image.convert('RGB')
    new_h, new_w, top, left = self.geometry(image.height, image.width)
    resample = Image.BICUBIC if self.interpolation == 'bicubic' else Image.BILINEAR
    image = image.resize((new_w, new_h), resample)
    size = self.image_size
    return np.asarray(image, np.uint8)[top:top + size, left:left + size]

  def normalize(self, pixels):
    """`normalize(pixels, self.mean, self.std)`."""
    return normalize(pixels, self.mean, self.std)


# A mean and std under which `normalize` leaves its input as it is (x / 255 * 255, to float32
# rounding): for callers of the train and eval steps that hold model inputs rather than pixels.
PASS_THROUGH = {'mean': (0.0, 0.0, 0.0), 'std': (1 / 255, 1 / 255, 1 / 255)}


def normalize(pixels, mean, std):
  """RGB pixel values (0-255, any dtype; NumPy or JAX, any leading axes) -> the model's input:
  x / 255, minus mean, over std, in float32 and in that order. Predict, the train and eval steps
  (on the device, from uint8 batches) and the exported uint8 programs all compute it so."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (pixels / np.float32(255.0) - mean) / std


def official_eval(image_size: int = 224) -> Preprocess:
  """The official CvT evaluation at `image_size`: centre crop 0.875 below 384, warp at 384+."""
  resize = 'warp' if image_size >= OFFICIAL_WARP_FROM else 'crop'
  return Preprocess(image_size=image_size, resize=resize)


def from_hf_processor(doc: Mapping[str, Any], source: str = 'preprocessor_config.json') -> Preprocess:
  """HF's ConvNext image processor (the one CvT checkpoints name) as a Preprocess.

  `size` is an int or {'shortest_edge': n}; below 384 it resizes the shorter side to
  int(n / crop_pct) and centre-crops (offset floored), at 384 and above it warps to n x n.
  """
  size = doc.get('size', {'shortest_edge': 384})
  if isinstance(size, Mapping):
    if 'shortest_edge' not in size:
      raise PreprocessError(f'{source}: size {size!r} has no shortest_edge; a CvT (ConvNext) '
                            'image processor needs one.')
    size = size['shortest_edge']
  if doc.get('do_resize', True) is False:
    raise PreprocessError(f'{source}: do_resize=false: cvt-flax models take a fixed-size input; '
                          'set do_resize.')
  resample = doc.get('resample', 3)
  if resample not in _HF_RESAMPLE:
    raise PreprocessError(f'{source}: resample={resample!r}; supported: {_HF_RESAMPLE} (PIL codes).')
  normalize = doc.get('do_normalize', True)
  try:
    return Preprocess(
        image_size=int(size), resize='warp' if size >= OFFICIAL_WARP_FROM else 'crop',
        crop_pct=float(doc.get('crop_pct', 224 / 256)), interpolation=_HF_RESAMPLE[resample],
        mean=tuple(doc.get('image_mean', IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(doc.get('image_std', IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0),
        crop_offset='floor')
  except PreprocessError as e:
    raise PreprocessError(f'{source}: {e}') from e


def to_hf_processor(preprocess: Preprocess) -> dict[str, Any]:
  """The preprocessor_config.json of HF's ConvNext processor for `preprocess`, where it can say it."""
  p = preprocess
  if (p.resize == 'warp') != (p.image_size >= OFFICIAL_WARP_FROM):
    raise PreprocessError(f'preprocess {p.resize!r} at {p.image_size} px: HF\'s ConvNext processor '
                          f'crops below {OFFICIAL_WARP_FROM} px and warps from there, nothing else.')
  resample = {v: k for k, v in _HF_RESAMPLE.items()}[p.interpolation]
  return {'image_processor_type': 'ConvNextImageProcessor', 'do_resize': True,
          'size': {'shortest_edge': p.image_size}, 'crop_pct': p.crop_pct, 'resample': resample,
          'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
          'image_mean': list(p.mean), 'image_std': list(p.std)}


def set_max_image_pixels(pixels: int) -> None:
  """Allows images of up to `pixels` pixels in every reader (a process-wide PIL setting: for the
  commands, which own their process)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.MAX_IMAGE_PIXELS = -(-pixels // 2)


def max_image_pixels() -> int:
  """The most pixels an image may have: what PIL refuses above as a likely decompression bomb (twice
  `PIL.Image.MAX_IMAGE_PIXELS`, 178,956,970 by default). Every reader of images applies it: predict
  and `load_image` through PIL, the input pipelines from the image's header before decoding."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2 ** 62


def too_many_pixels(pixels: int | None = None) -> str:
  """The one message for an image over `max_image_pixels` (of `pixels` pixels, if known)."""
  size = f'{pixels:,} pixels' if pixels else 'too many pixels'
  return (f'image of {size}, more than the {max_image_pixels():,} allowed (a decompression '
          'bomb?); if the image is trusted, raise the limit: PIL.Image.MAX_IMAGE_PIXELS (images '
          'up to twice it are read), or predict --max-image-pixels N.')


def load_image(path):
  """Reads an image file as an RGB PIL image; a clear ImageError if it is not a readable image or
  has more than `max_image_pixels()` pixels."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():  # PIL warns from half the limit on: below it, nothing to say
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path) as img:
        img.load()
        return _eight_bit(img).convert('RGB')
  except Image.DecompressionBombError as e:
    pixels = re.search(r'\((\d+) pixels\)', str(e))  # PIL's message: "Image size (N pixels) ..."
    raise ImageError(f'{path}: {too_many_pixels(int(pixels[1]) if pixels else None)}') from e
  except FileNotFoundError as e:
    raise ImageError(f'{path}: no such file') from e
  except UnidentifiedImageError as e:
    raise ImageError(f'{path}: not a readable image file (JPEG, PNG, ...)') from e
  except (OSError, SyntaxError) as e:  # truncated or corrupt data
    raise ImageError(f'{path}: corrupt or truncated image ({e})') from e


def _eight_bit(image):
  """16-bit grey images scaled to 8 bits, as the input pipelines' decoder does (PIL's
  convert('RGB') would clip them at 255: a white image); other modes as they are."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.mode not in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):
    return image
  values = np.asarray(image, np.int64).clip(0, 65535)
  return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def add_flags(parser) -> None:
  """Command-line overrides of a checkpoint's preprocessing (predict, evaluate)."""
  group = parser.add_argument_group('preprocessing (default: what the checkpoint records)')
  group.add_argument('--image-size', type=int, help='input resolution')
  group.add_argument('--resize', choices=RESIZE_MODES, help='centre crop or warp')
  group.add_argument('--crop-pct', type=float, help='crop fraction of the shorter side (crop)')
  group.add_argument('--interpolation', choices=INTERPOLATIONS)


def from_flags(base: Preprocess | None, args) -> Preprocess:
  """`base` with the flags' overrides (each changes only the field it names). With no `base` (a
  model that records no preprocessing) the official ImageNet eval at the flags' size, or 224."""
  if base is None:
    base = official_eval(args.image_size or 224)
  return base.replace(image_size=args.image_size, resize=args.resize, crop_pct=args.crop_pct,
                      interpolation=args.interpolation)
