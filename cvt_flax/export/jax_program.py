"""The `jax` format: the forward pass serialized by `jax.export` (StableHLO), weights baked in.

    OUT/model.jax    the program: images (batch, height, width, 3) -> logits (batch, classes)
    OUT/model.json   the model document (`spec.model_doc`)

The weights are constants of the program rather than an argument: the file is the whole model, a
server needs nothing but jax and these two files, and no weight layout has to be agreed on; the
price is a file as large as the weights. Loading, in a process without cvt-flax:

    exported = jax.export.deserialize(bytearray(open('OUT/model.jax', 'rb').read()))
    logits = exported.call(images)
"""
from __future__ import annotations

import os

import jax

from cvt_flax import files
from cvt_flax.export import spec as spec_lib
from cvt_flax.models import CvT
from cvt_flax.runtime import compiler

PROGRAM_FILE = 'model.jax'
PARTS = (PROGRAM_FILE,)  # what `write` puts beside model.json
FORMAT = 'cvt_flax.jax_export'  # model.json's "format"


def export_forward(model: CvT, spec: spec_lib.ServingSpec) -> jax.export.Exported:
  """The serving function of `model` (`spec.serving_function`) as a `jax.export.Exported`, the
  batch symbolic unless `spec.batch` fixes it, lowered for `spec.platforms`."""
  apply, weights = spec_lib.serving_function(model, spec)
  forward = compiler.jit(lambda images: apply(weights, images), platform=spec.platforms[0])
  batch = jax.export.symbolic_shape('batch')[0] if spec.batch is None else spec.batch
  return jax.export.export(forward, platforms=spec.platforms)(spec_lib.input_struct(spec, batch))


def write(model: CvT, directory: str, spec: spec_lib.ServingSpec) -> dict:
  """Writes OUT/model.jax into `directory`; returns model.json's "program"."""
  exported = export_forward(model, spec)
  files.write_bytes(os.path.join(directory, PROGRAM_FILE), exported.serialize())
  return {'file': PROGRAM_FILE, 'serialization': 'jax.export', 'jax_version': jax.__version__,
          'platforms': list(exported.platforms)}
