"""Classify images with a CvT checkpoint.

  python -m cvt_flax.predict --checkpoint CKPT [--top-k 5] [--json] IMAGE [IMAGE ...]

CKPT is anything cvt-flax loads: a model checkpoint written by `python -m cvt_flax.convert` or
`cvt_flax.save_model`, a training workdir, an official `.pth`, or an HF directory / weights file.
Images of any size and mode (grayscale, RGBA, CMYK, palette) are converted to RGB, then preprocessed
as the checkpoint's resolution was evaluated: up to 256 px (224 models) resize the shorter side to
size/0.875 and center crop; above that (the 384 models) warp to size x size. Bicubic resampling
(PIL), ImageNet mean/std. Labels: the checkpoint's own names if it has them, ImageNet-1k names for
1000-class models, else class indices.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_PCT = 0.875
_BATCH = 8  # fixed batch size so that any number of images compiles once


class ImageError(ValueError):
  """An input image could not be read."""


def load_image(path):
  """Reads an image file as an RGB PIL image; a clear ImageError if it is not a readable image."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        # Composite transparency onto white rather than letting PIL drop alpha to black pixels.
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
      return img.convert('RGB')
  except FileNotFoundError as e:
    raise ImageError(f'{path}: no such file') from e
  except UnidentifiedImageError as e:
    raise ImageError(f'{path}: not a readable image file (JPEG, PNG, ...)') from e
  except (OSError, SyntaxError) as e:  # truncated or corrupt data
    raise ImageError(f'{path}: corrupt or truncated image ({e})') from e


def preprocess(img, size: int) -> np.ndarray:
  """PIL RGB image -> normalised float32 (size, size, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if size > 256:  # the 384 models are evaluated on a warped image
    img = img.resize((size, size), Image.BICUBIC)
  else:
    scale = (size / CROP_PCT) / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
  x = np.asarray(img, np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def imagenet_class_names() -> list[str]:
  path = pathlib.Path(__file__).with_name('imagenet_classes.txt')
  return path.read_text().splitlines()


def class_names(num_classes: int, names=None) -> list[str]:
  if names and len(names) == num_classes:
    return list(names)
  if num_classes == 1000:
    return imagenet_class_names()
  return [str(i) for i in range(num_classes)]


def load_model(checkpoint: str):
  """Loads any checkpoint format cvt-flax knows, in eval mode."""
  from cvt_flax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cvt_flax import convert  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f'{checkpoint}: no such checkpoint file or directory')
  if path.is_dir() and ((path / 'state').is_dir() or (path / 'checkpoints').is_dir()):
    return ckpt_lib.load_checkpoint(str(path))
  return convert.load_pytorch(str(path))


def predict(model, images: np.ndarray, top_k: int = 5):
  """(N, H, W, 3) preprocessed images -> (top-k indices (N, k), probabilities (N, k))."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from cvt_flax.models import compiler_options  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=compiler_options())
  def probs_fn(state, x):
    return jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1)

  n = len(images)
  pad = (-n) % _BATCH
  padded = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  probs = np.concatenate([np.asarray(probs_fn(state, padded[i:i + _BATCH]))
                          for i in range(0, len(padded), _BATCH)])[:n]
  k = min(top_k, probs.shape[-1])
  top = np.argsort(-probs, axis=-1)[:, :k]
  return top, np.take_along_axis(probs, top, axis=-1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--top-k', type=int, default=5)
  parser.add_argument('--image-size', type=int, default=224,
                      help='evaluation resolution of the checkpoint (224 or 384 for released models)')
  parser.add_argument('--json', action='store_true', help='machine-readable output')
  parser.add_argument('images', nargs='+')
  args = parser.parse_args(argv)
  try:
    batch = np.stack([preprocess(load_image(p), args.image_size) for p in args.images])
    model = load_model(args.checkpoint)
  except (ImageError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  names = class_names(model.config.num_classes, getattr(model, 'class_names', None))
  top, probs = predict(model, batch, args.top_k)
  results = [{'image': path, 'top_k': [{'label': names[i], 'index': int(i), 'prob': float(p)}
                                       for i, p in zip(idx, pr)]}
             for path, idx, pr in zip(args.images, top, probs)]
  if args.json:
    print(json.dumps(results, indent=1))
  else:
    for r in results:
      print(r['image'])
      for entry in r['top_k']:
        print(f"  {entry['prob']:7.2%}  {entry['label']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
