"""Export a CvT checkpoint as a serialized JAX program (`jax.export`), served with jax alone.

  python -m cvt_flax.export CHECKPOINT OUT [--batch N] [--dtype float32|bfloat16]
      [--platforms cpu,cuda,tpu] [--image-size S | HxW] [--overwrite]

CHECKPOINT is any checkpoint reference `from_pretrained` takes (a hub name, `.pth`, HF directory,
model directory, workdir, `gs://...`). OUT is a new directory (`--overwrite` replaces one), written
atomically:

    OUT/model.jax    the eval-mode forward pass, serialized by `jax.export` (StableHLO): images
                     (batch, height, width, 3) float32, normalised as `model.preprocess` makes them
                     (NHWC, what `model(x)` takes) -> logits (batch, num_classes) float32. The batch
                     is symbolic unless a fixed one was asked for: one file serves any batch size.
    OUT/model.json   the model document, in a model directory's vocabulary (`model_dir`:
                     architecture, preprocess, class names), and "program": the input's layout,
                     shape and dtype, the compute dtype and the platforms it was lowered for.

The weights are baked into the program as constants rather than passed in: the file is the whole
model, a server needs nothing but jax and these two files, and no weight layout has to be agreed
on; the price is a file as large as the weights. Loading, in a process without cvt-flax:

    exported = jax.export.deserialize(bytearray(open('OUT/model.jax', 'rb').read()))
    logits = exported.call(images)

The program uses the plain XLA paths of the model (one grouped convolution per depthwise conv,
attention normalised after the product with v): one program lowers for every platform asked, and
CPU-only paths would be slower elsewhere. Same function as `model(x)` up to float rounding.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cvt_flax import errors, files, io, preprocess as preprocess_lib
from cvt_flax.errors import CvtFlaxError
from cvt_flax.io.model_dir import ModelDoc
from cvt_flax.models import CvT, with_compute
from cvt_flax.runtime import compiler, platforms as platforms_lib

PROGRAM_FILE = 'model.jax'
DOC_FILE = 'model.json'
FORMAT = 'cvt_flax.jax_export'  # model.json's "format"; its other keys are a model directory's
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's names
# The plain XLA paths: the same on every platform (see the module docstring).
PORTABLE_COMPUTE = dict(dwconv_impl='xla', attention_impl='deferred', fusion_barrier=False,
                        per_token_linear=False, remat='none')


class ExportError(CvtFlaxError, ValueError):
  """An export that cannot be made as asked; the message says which setting and why."""


def _image_shape(model: CvT, image_size) -> tuple[int, int]:
  if image_size is None:
    image_size = model.preprocess.image_size if model.preprocess else 224
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  return int(height), int(width)


def export_forward(model: CvT, *, batch: int | None = None, image_size=None,
                   dtype: str = 'float32',
                   platforms: Sequence[str] = ('cpu',)) -> jax.export.Exported:
  """The eval-mode forward pass of `model` as a `jax.export.Exported`: batch `batch` (None:
  symbolic), images of `image_size` (an int, (height, width), or None: the model's preprocess
  size, else 224), computed in `dtype`, lowered for `platforms`."""
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ExportError(f'platforms {list(platforms)}: expected some of {PLATFORMS}.')
  if batch is not None and batch < 1:
    raise ExportError(f'batch {batch}: expected a positive batch size, or None (any).')
  model = with_compute(model, dtype=dtype, platform=platforms[0], **PORTABLE_COMPUTE)
  model.eval()
  graphdef, state = nnx.split(model)
  forward = compiler.jit(lambda images: nnx.merge(graphdef, state)(images).astype(jnp.float32),
                         platform=platforms[0])
  height, width = _image_shape(model, image_size)
  batch_dim = jax.export.symbolic_shape('batch')[0] if batch is None else batch
  images = jax.ShapeDtypeStruct((batch_dim, height, width, 3), jnp.float32)
  return jax.export.export(forward, platforms=tuple(platforms))(images)


def export_model(model: CvT, path, *, overwrite: bool = False, **options) -> jax.export.Exported:
  """Writes OUT/model.jax and OUT/model.json (see the module docstring) into the directory `path`,
  atomically; `options` are `export_forward`'s."""
  exported = export_forward(model, **options)
  batch, height, width, channels = exported.in_avals[0].shape
  batch = batch if isinstance(batch, int) else None  # None: symbolic, any batch size
  doc = dict(ModelDoc.of(model).to_json(), format=FORMAT)
  doc['program'] = {
      'file': PROGRAM_FILE, 'serialization': 'jax.export', 'jax_version': jax.__version__,
      'input': {'layout': 'NHWC', 'dtype': 'float32', 'normalised': True,
                'shape': [batch, height, width, channels]},
      'output': {'dtype': 'float32', 'shape': [batch, model.config.num_classes]},
      'compute_dtype': options.get('dtype', 'float32'), 'platforms': list(exported.platforms)}
  if doc['preprocess'] is None:  # a server must know how to make the input
    doc['preprocess'] = preprocess_lib.official_eval(height).to_dict()
  with files.atomic_directory(path, commit_file=DOC_FILE, parts=(PROGRAM_FILE,),
                              overwrite=overwrite) as tmp:
    files.write_bytes(os.path.join(tmp, PROGRAM_FILE), exported.serialize())
    files.write_json(os.path.join(tmp, DOC_FILE), doc)  # last: the directory is complete
  return exported


def _image_size(text: str):
  height, _, width = text.lower().partition('x')
  return (int(height), int(width or height))


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cvt_flax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('checkpoint', help='checkpoint reference (see above)')
  parser.add_argument('out', help='output directory')
  parser.add_argument('--batch', type=int, help='a fixed batch size (default: any)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype (inputs and logits are float32 either way)')
  parser.add_argument('--platforms', default='cpu',
                      help=f'comma-separated, of {",".join(PLATFORMS)} (default: cpu)')
  parser.add_argument('--image-size', type=_image_size,
                      help="S or HxW (default: the checkpoint's preprocess size, else 224)")
  parser.add_argument('--revision', help='hub revision (branch, tag or commit) of a hub name')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  platforms_lib.skip_tpu_without_chips()
  try:
    model = io.from_pretrained(args.checkpoint, revision=args.revision)
    exported = export_model(model, args.out, overwrite=args.overwrite, batch=args.batch,
                            image_size=args.image_size, dtype=args.dtype,
                            platforms=tuple(args.platforms.split(',')))
  except FileExistsError:
    print(f'error: {args.out} exists; pass --overwrite to replace it.', file=sys.stderr)
    return 2
  except errors.EXPECTED_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.out}: {PROGRAM_FILE} ({exported.in_avals[0].str_short()} -> '
        f'{exported.out_avals[0].str_short()}, {args.dtype} compute, for '
        f'{", ".join(exported.platforms)}) and {DOC_FILE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
