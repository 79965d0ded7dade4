"""The `savedmodel` format: a TF SavedModel for TF Serving and Vertex AI, written by Orbax Export.

    OUT/saved_model.pb, OUT/variables/, ...   the SavedModel: signature "serving_default",
                                              input "images" -> output "logits"
    OUT/model.json                            the model document (`spec.model_doc`)

Orbax Export is JAX's documented route to a SavedModel: it wraps the serving function with
jax2tf's native serialization, so the SavedModel runs the same StableHLO as the `jax` format
(inside one XlaCallModule op, lowered for the platforms asked) and holds the weights as TF
variables. A dynamic batch unless one is fixed. Needs the `train` (TensorFlow) and `export`
extras; TensorFlow sees no accelerator (`cvt_flax.data._tf`).
"""
from __future__ import annotations

import tempfile

from cvt_flax import files, logs
from cvt_flax.data._tf import tf  # before orbax.export imports TensorFlow: hides accelerators
from cvt_flax.export import spec as spec_lib
from cvt_flax.models import CvT
from orbax.export import ExportManager, JaxModule, ServingConfig  # after _tf: pylint: disable=C0411

PROGRAM_FILE = 'saved_model.pb'
PARTS = (PROGRAM_FILE, 'variables', 'assets', 'fingerprint.pb')  # what tf.saved_model writes
FORMAT = 'cvt_flax.saved_model'  # model.json's "format"
SIGNATURE, INPUT_NAME, OUTPUT_NAME = 'serving_default', 'images', 'logits'


def save(model: CvT, directory: str, spec: spec_lib.ServingSpec) -> None:
  """Writes the SavedModel of `model`'s serving function into the local `directory`."""
  apply, weights = spec_lib.serving_function(model, spec)
  batch = 'b' if spec.batch is None else str(spec.batch)
  module = JaxModule(weights, lambda weights, images: {OUTPUT_NAME: apply(weights, images)},
                     input_polymorphic_shape=f'({batch}, {spec.height}, {spec.width}, 3)',
                     jax2tf_kwargs={'native_serialization_platforms': spec.platforms})
  signature = tf.TensorSpec((spec.batch, spec.height, spec.width, 3), tf.as_dtype(spec.input),
                            name=INPUT_NAME)
  manager = ExportManager(module, [ServingConfig(SIGNATURE, input_signature=[signature])])
  with logs.native_stderr_without(r'All log messages before absl::InitializeLog\(\) is called'):
    manager.save(directory)  # TF's C++ logging starts here and says so on the raw descriptor


def write(model: CvT, directory: str, spec: spec_lib.ServingSpec) -> dict:
  """Writes the SavedModel into `directory` (a local path or a URL); returns model.json's
  "program"."""
  with tempfile.TemporaryDirectory() as local:
    save(model, local, spec)
    files.upload_tree(local, directory)
  return {'file': PROGRAM_FILE, 'serialization': 'tf.saved_model', 'tensorflow': tf.__version__,
          'signature': SIGNATURE, 'input_name': INPUT_NAME, 'output_name': OUTPUT_NAME,
          'platforms': list(spec.platforms)}
