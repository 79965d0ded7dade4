"""Classify images with a CvT checkpoint.

  python -m cvt_flax.predict --checkpoint REF [--top-k 5] [--json] IMAGE [IMAGE ...]

REF is any checkpoint reference (`cvt_flax.io.load`): a model directory, a training workdir, an
official `.pth`, an HF directory or weights file, or a hub name (`microsoft/cvt-13`,
`org/name@revision`). Images of any size and mode (grayscale, RGBA, CMYK, palette) are converted to
RGB and preprocessed as the checkpoint records (`--image-size`, `--resize`, `--crop-pct`,
`--interpolation` override it; a checkpoint that records nothing gets the official ImageNet eval at
224 px, with a note). Labels: the checkpoint's class names, else class indices.
With --json, stdout is one JSON list: [{"image", "top_k": [{"label", "index", "prob"}...]}...].
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import numpy as np
from flax import nnx

from cvt_flax import errors, io, labels
from cvt_flax import preprocess as preprocess_lib
from cvt_flax.runtime import compiler, platforms

BATCH = 8  # images per call: any number of images runs one compiled program per input size


def _softmax_logits(graphdef, state, images):
  return jax.nn.softmax(nnx.merge(graphdef, state)(images), axis=-1)


@functools.cache
def _probabilities():
  """The jitted forward pass; built on first use, so importing this module starts no backend."""
  return compiler.jit(_softmax_logits, static_argnums=0)


def predict(model, images: np.ndarray, top_k: int = 5):
  """(N, H, W, 3) preprocessed images -> (top-k indices (N, k), probabilities (N, k)).

  Compiled once per model architecture and image size (batches of BATCH, the last one padded).
  """
  graphdef, state = nnx.split(model)
  n = len(images)
  padded = np.concatenate([images, np.zeros(((-n) % BATCH,) + images.shape[1:], images.dtype)])
  probs = np.concatenate([np.asarray(_probabilities()(graphdef, state, padded[i:i + BATCH]))
                          for i in range(0, len(padded), BATCH)])[:n]
  k = min(top_k, probs.shape[-1])
  top = np.argsort(-probs, axis=-1)[:, :k]
  return top, np.take_along_axis(probs, top, axis=-1)


def classify(model, images, top_k: int = 5, preprocess=None) -> list[list[dict]]:
  """PIL images or HxWx3 uint8 arrays -> per image, its top-k [{'label', 'index', 'prob'}].

  `preprocess`: default the model's own (`model.preprocess`)."""
  transform = preprocess or model.preprocess or preprocess_lib.official_eval(224)
  top, probs = predict(model, np.stack([transform(img) for img in images]), top_k)
  names = labels.display_names(model.class_names, model.config.num_classes)
  return [[{'label': names[i], 'index': int(i), 'prob': float(p)} for i, p in zip(idx, pr)]
          for idx, pr in zip(top, probs)]


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cvt_flax.predict',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='checkpoint reference (see above)')
  parser.add_argument('--revision', help='hub revision (branch, tag or commit)')
  parser.add_argument('--top-k', type=int, default=5)
  parser.add_argument('--json', action='store_true', help='machine-readable output')
  parser.add_argument('--max-image-pixels', type=int,
                      help='read trusted images of up to this many pixels (default: PIL\'s limit)')
  preprocess_lib.add_flags(parser)
  parser.add_argument('images', nargs='+')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  platforms.cpu_only_without_accelerator()
  if args.max_image_pixels:
    preprocess_lib.set_max_image_pixels(args.max_image_pixels)
  with errors.reported():
    images = [preprocess_lib.load_image(p) for p in args.images]
    model = io.from_pretrained(args.checkpoint, revision=args.revision)
    if model.preprocess is None:
      print(f'note: {args.checkpoint} records no preprocessing; using the official ImageNet eval '
            'transform (see --image-size, --resize).', file=sys.stderr)
    transform = preprocess_lib.from_flags(model.preprocess, args)
    results = classify(model, images, args.top_k, transform)
  if args.json:
    print(json.dumps([{'image': path, 'top_k': top} for path, top in zip(args.images, results)],
                     indent=1))
    return 0
  for path, top in zip(args.images, results):
    print(path)
    for entry in top:
      print(f"  {entry['prob']:7.2%}  {entry['label']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
