"""The one place our code imports TensorFlow: TF only feeds the host, it must never hold accelerators.

JAX owns the GPUs/TPUs. A TensorFlow runtime that saw them would reserve their memory (GPU) or claim
the device (TPU), so both device types are hidden before TF creates any op.
"""
import logging
import os

# TF's C++ INFO lines (oneDNN, CPU features) are noise in a JAX program; warnings still show. Only a
# default: a value the user set wins, and it has no effect if TF was imported before us.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

for _device_type in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _device_type)
  except (RuntimeError, ValueError) as e:
    # RuntimeError: the TF runtime was initialised earlier (by other code); nothing we can undo here.
    logging.warning('cvt_flax.data: could not hide %s devices from TensorFlow: %s', _device_type, e)
