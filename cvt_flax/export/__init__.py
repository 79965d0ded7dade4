"""Export a CvT checkpoint for serving: a serialized JAX program, an ONNX graph or a TF SavedModel.

  python -m cvt_flax.export CHECKPOINT OUT [--format jax|onnx|savedmodel] [--batch N]
      [--input float32|uint8] [--dtype float32|bfloat16] [--platforms cpu,cuda,tpu]
      [--image-size S | HxW] [--overwrite]

CHECKPOINT is any checkpoint reference `from_pretrained` takes (a hub name, `.pth`, HF directory,
model directory, workdir, `gs://...`). OUT is a new directory (`--overwrite` replaces one), local or
`gs://`, written atomically: the program (`jax_program`, `onnx_graph`, `saved_model` say what each
format writes and why) and OUT/model.json, which says what a server needs around it in a model
directory's vocabulary (architecture, preprocess, class names) plus "program": the file, the
input's layout, dtype and shape (null: any batch), and the format's own details.

Every program takes NHWC images of a fixed height and width and returns float32 logits. Input
'float32' (the default) is normalised as `model.preprocess` makes it, what `model(x)` takes;
'uint8' is pixels 0-255 already resized and cropped to that size, normalised inside the program
(resizing stays outside: PIL's antialiased bicubic has no exact equivalent in any of the three).
"""
from __future__ import annotations

import os
from types import ModuleType

from cvt_flax import errors, files
from cvt_flax.export.spec import DOC_FILE, ExportError, ServingSpec, model_doc
from cvt_flax.models import CvT

# format -> (its module, the packages it needs by extra)
FORMATS = {
    'jax': ('cvt_flax.export.jax_program', {}),
    'onnx': ('cvt_flax.export.onnx_graph', {'torch': ('torch',), 'export': ('onnx', 'onnxscript')}),
    'savedmodel': ('cvt_flax.export.saved_model',
                   {'train': ('tensorflow',), 'export': ('orbax.export',)}),
}


def writer(format: str) -> ModuleType:
  """The module writing `format`, or one clear error for an unknown format or a missing extra."""
  if format not in FORMATS:
    raise ExportError(f'format {format!r}: expected one of {", ".join(FORMATS)}.')
  module, needs = FORMATS[format]
  for extra, packages in needs.items():
    errors.require_installed(extra, *packages)
  return errors.require(module, 'export')


def export_model(model: CvT, path, *, format: str = 'jax', overwrite: bool = False,
                 **options) -> dict:
  """Writes `model` in `format` into the directory `path` (see the module docstring), atomically;
  `options` are `ServingSpec.of`'s (batch, image_size, dtype, platforms, input). Returns the model
  document written as OUT/model.json."""
  module = writer(format)
  spec = ServingSpec.of(model, **options)
  if format == 'onnx' and spec.platforms != ('cpu',):
    raise ExportError(f'platforms {list(spec.platforms)}: an ONNX graph is not lowered for a '
                      'platform (onnxruntime picks its execution provider); drop --platforms.')
  with files.atomic_directory(path, commit_file=DOC_FILE, parts=module.PARTS,
                              overwrite=overwrite) as tmp:
    doc = model_doc(model, spec, module.FORMAT, module.write(model, tmp, spec))
    files.write_json(os.path.join(tmp, DOC_FILE), doc)  # last: the directory is complete
  return doc
