"""`python -m cvt_flax.export CHECKPOINT OUT [--format jax|onnx|savedmodel] ...` (see the package
docstring)."""
from __future__ import annotations

import argparse
import sys

from cvt_flax import errors, export, io
from cvt_flax.export import spec as spec_lib
from cvt_flax.runtime import platforms as platforms_lib


def _image_size(text: str):
  height, _, width = text.lower().partition('x')
  return (int(height), int(width or height))


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cvt_flax.export',
                                   description=export.__doc__.split('\n\n')[0])
  parser.add_argument('checkpoint', help='checkpoint reference (hub name, file, directory, gs://)')
  parser.add_argument('out', help='output directory')
  parser.add_argument('--format', default='jax',
                      help=f'{" | ".join(export.FORMATS)} (default: jax)')
  parser.add_argument('--batch', type=int, help='a fixed batch size (default: any)')
  parser.add_argument('--input', default='float32', choices=spec_lib.INPUTS,
                      help='normalised float32 images (default), or uint8 pixels at the size')
  parser.add_argument('--dtype', default='float32',
                      help='compute dtype, float32 or bfloat16 (logits are float32 either way)')
  parser.add_argument('--platforms', default='cpu',
                      help=f'comma-separated, of {",".join(spec_lib.PLATFORMS)} (default: cpu)')
  parser.add_argument('--image-size', type=_image_size,
                      help="S or HxW (default: the checkpoint's preprocess size, else 224)")
  parser.add_argument('--revision', help='hub revision (branch, tag or commit) of a hub name')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
  return parser.parse_args(argv)


def _summary(args, doc) -> str:
  program = doc['program']
  dims = lambda shape: ','.join('batch' if d is None else str(d) for d in shape)
  where = f', for {", ".join(program["platforms"])}' if 'platforms' in program else ''
  return (f'wrote {args.out}: {program["file"]} ({program["input"]["dtype"]}'
          f'[{dims(program["input"]["shape"])}] -> float32[{dims(program["output"]["shape"])}], '
          f'{program["compute_dtype"]} compute{where}) and {export.DOC_FILE}')


def main(argv=None) -> int:
  args = _parse_args(argv)
  platforms_lib.cpu_only_without_accelerator()
  with errors.reported():
    export.writer(args.format)  # an unknown format or a missing extra, before loading anything
    model = io.from_pretrained(args.checkpoint, revision=args.revision)
    try:
      doc = export.export_model(model, args.out, format=args.format, overwrite=args.overwrite,
                                batch=args.batch, image_size=args.image_size, dtype=args.dtype,
                                platforms=tuple(args.platforms.split(',')), input=args.input)
    except FileExistsError:
      errors.fail(f'{args.out} exists; pass --overwrite to replace it.')
  print(_summary(args, doc))
  return 0


if __name__ == '__main__':
  sys.exit(main())
