"""Bad input data fails loudly, naming the example: labels out of range, images that do not decode.

A label outside [0, num_classes) (e.g. the -1 of an unlabelled split) would silently train or score
against the wrong class; it is checked inside the pipeline, where the example id is at hand. A
decode error inside tf.data carries no example id, so the iterator catches it and re-runs the
failing batch's examples one by one, eagerly, to name the ones that fail.
"""
import collections.abc
import re
from typing import Callable

import tensorflow as tf

from cvt_flax.errors import CvtFlaxError

_LABEL_TAG = 'cvt_flax label check:'


class DataError(CvtFlaxError, ValueError):
  """Bad input data; the message names the dataset, the example (file or TFDS id), the problem."""


def checked_label(label, example_id, num_classes: int, dataset: str):
  """`label` as int32, failing the pipeline with the example id if it is not a class id."""
  label = tf.cast(label, tf.int32)
  in_range = tf.logical_and(label >= 0, label < num_classes)
  check = tf.debugging.Assert(in_range, [
      f'{_LABEL_TAG} dataset {dataset}: example', example_id, 'has label', label,
      f'but the classes are 0 to {num_classes - 1} (an unlabelled split, or a class id the '
      'dataset info does not declare?)'])
  with tf.control_dependencies([check]):
    return tf.identity(label)


def _label_message(error: tf.errors.OpError) -> str | None:
  """The text of a failed `checked_label` assertion, or None for other errors."""
  found = re.search(r'assertion failed: (.*)', error.message)
  if not found or _LABEL_TAG not in found.group(1):
    return None
  parts = re.findall(r'\[(.*?)\](?: |$)', found.group(1))
  return ' '.join(parts).replace(_LABEL_TAG, '').strip()


def first_line(error: tf.errors.OpError) -> str:
  """TF's message without the function-node prefix and the op suffix."""
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', error.message).strip()
  return re.split(r'\s*\[Op:|\n', text)[0].rstrip('. ')


class NamedErrors(collections.abc.Iterator):
  """Wraps an iterator of numpy batches; a TF error in its k-th batch becomes a DataError naming the
  bad examples, found by `diagnose(k)` -> list of 'example id: problem' strings. `first` is the
  number of the first batch in messages (a resumed train iterator starts at its start step)."""

  def __init__(self, batches: collections.abc.Iterator, diagnose: Callable[[int], list[str]],
               what: str, first: int = 0):
    self._batches, self._diagnose, self._what, self._first = batches, diagnose, what, first
    self._count = 0

  def __next__(self):
    try:
      batch = next(self._batches)
    except tf.errors.OpError as e:
      raise DataError(self._explain(e)) from e
    self._count += 1
    return batch

  def _explain(self, error: tf.errors.OpError) -> str:
    label = _label_message(error)
    if label is not None:
      return f'{self._what}: {label}.'
    bad = self._diagnose(self._count)
    batch = self._first + self._count
    if bad:
      return (f'{self._what}: cannot read {len(bad)} example(s) of batch {batch}: '
              + '; '.join(bad) + '. Remove or re-encode the file(s).')
    return (f'{self._what}: the pipeline failed in batch {batch}, but no single example of that '
            f'batch fails on its own: {first_line(error)}')


def failing_examples(records, transform: Callable) -> list[str]:
  """'id: error' for each record {'id', ...} on which `transform(record)` raises, run eagerly."""
  bad = []
  for record in records:
    try:
      transform(record)
    except tf.errors.OpError as e:
      bad.append(f'{record["id"].numpy().decode(errors="replace")}: {first_line(e)}')
  return bad
