"""The one place our code imports TensorFlow: TF only feeds the host, it must never hold accelerators.

JAX owns the GPUs/TPUs. A TensorFlow runtime that saw them would reserve their memory (GPU) or claim
the device (TPU), so both device types are hidden before TF creates any op.
"""
import logging

import tensorflow as tf

for _device_type in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _device_type)
  except (RuntimeError, ValueError) as e:
    # RuntimeError: the TF runtime was initialised earlier (by other code); nothing we can undo here.
    logging.warning('cvt_flax.data: could not hide %s devices from TensorFlow: %s', _device_type, e)
