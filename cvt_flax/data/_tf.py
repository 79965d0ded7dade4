"""The one place our code imports TensorFlow: TF only feeds the host (and writes SavedModels,
`cvt_flax.export.saved_model`); it must never hold accelerators.

JAX owns the GPUs/TPUs. A TensorFlow runtime that saw them would reserve their memory (GPU) or claim
the device (TPU), so both device types are hidden before TF creates any op.
"""
import logging
import os

# TF's C++ INFO lines are noise in a JAX program; warnings still show. Only a default: a value the
# user set wins, and it has no effect if TF was imported before us. (It does not reach the lines
# TF prints before its logging starts: those are dropped below.)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from cvt_flax import files, logs  # pylint: disable=g-import-not-at-top,wrong-import-position

files.use_gcsfs_for_urls()  # before TFDS gives etils.epath its first URL (see there)

# TensorFlow's C++ start-up announces its oneDNN kernels on the raw descriptor, before any log level
# applies; TFDS's readers call TF APIs that TF has deprecated, which TF then logs on each use.
with logs.native_stderr_without(r'oneDNN custom operations are on',
                                r'All log messages before absl::InitializeLog\(\) is called'):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
logs.drop_messages('tensorflow', r'^From .*/tensorflow_datasets/.* is deprecated')
logs.drop_messages('absl', r'^Variant folder .* has no dataset_info\.json')

for _device_type in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _device_type)
  except (RuntimeError, ValueError) as e:
    # RuntimeError: the TF runtime was initialised earlier (by other code); nothing we can undo here.
    logging.warning('cvt_flax.data: could not hide %s devices from TensorFlow: %s', _device_type, e)
