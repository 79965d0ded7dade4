"""The cvt-flax model directory (format version 2) and the model document it shares with workdirs.

    DIR/config.json   the model document:
                        {"format": "cvt_flax.model", "version": 2,
                         "config":      {architecture fields, CvTConfig.to_dict()},
                         "preprocess":  {image_size, resize, crop_pct, interpolation, mean, std,
                                         crop_offset} or null (unknown),
                         "class_names": [one per class] or null (unknown)}
    DIR/state/        Orbax checkpoint of the nnx.Param and nnx.BatchStat values, a nested dict
                      following the attribute paths (`stage0/blocks/0/attn/...`).

A training workdir stores the same document as WORKDIR/model_config.json (`cvt_flax.io.workdir`).
Compute settings (dtype, implementation switches) are never stored: they are how a model runs, not
what it is. Version 1 (before 2026-12) had no preprocess and class names, and kept the compute
settings in "config"; it still loads, with the official ImageNet eval transform at 224 px and
ImageNet names for 1000 classes, and a one-line note.

A save writes config.json last (`cvt_flax.files.atomic_directory`): locally into a temporary
sibling directory renamed into place as the last step; on Cloud Storage in place, after deleting
the config.json of a model it replaces. Either way an interrupted save leaves no directory that
loads as a model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cvt_flax import files, labels
from cvt_flax import preprocess as preprocess_lib
from cvt_flax.errors import CvtFlaxError, Note
from cvt_flax.models import CvT, CvTConfig, abstract_model, finish_abstract_model
from cvt_flax.models.config import config_from_saved
from cvt_flax.models.weights import describe_differences, flat_variables, flatten, nest, shapes

FORMAT = 'cvt_flax.model'
VERSION = 2
CONFIG_FILE = 'config.json'
STATE_DIR = 'state'


class CheckpointError(CvtFlaxError, ValueError):
  """A path does not hold a loadable model; the message says which file and why."""


class FormatNote(Note):
  """A model file in an older format was read with the defaults it implies."""


@dataclasses.dataclass(frozen=True)
class ModelDoc:
  """What a model document says: the architecture, the eval transform and the class names."""
  config: CvTConfig
  preprocess: preprocess_lib.Preprocess | None
  class_names: tuple[str, ...] | None

  @classmethod
  def of(cls, model: CvT, **overrides) -> 'ModelDoc':
    """The document of `model` (its own preprocess and class names unless overridden)."""
    fields = dict(config=model.config, preprocess=model.preprocess, class_names=model.class_names)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    names = labels.checked(fields['class_names'], model.config.num_classes, 'class_names')
    return cls(fields['config'], fields['preprocess'], names)

  def to_json(self) -> dict[str, Any]:
    return {'format': FORMAT, 'version': VERSION, 'config': self.config.to_dict(),
            'preprocess': self.preprocess.to_dict() if self.preprocess else None,
            'class_names': list(self.class_names) if self.class_names else None}

  def apply(self, model: CvT) -> CvT:
    model.preprocess, model.class_names = self.preprocess, self.class_names
    return model


def write_model_doc(path: str, doc: ModelDoc) -> None:
  files.write_json(path, doc.to_json())


def read_model_doc(path: str) -> ModelDoc:
  """The document in `path` (a config.json or model_config.json), checking format and version."""
  if not files.isfile(path):
    raise CheckpointError(f'{path}: missing; not a cvt-flax model (an unfinished save leaves none).')
  try:
    doc = files.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path}: corrupt, not valid JSON ({e}).') from e
  if not isinstance(doc, dict) or doc.get('format') != FORMAT:
    found = doc.get('format') if isinstance(doc, dict) else type(doc).__name__
    raise CheckpointError(f'{path}: format {found!r}, expected {FORMAT!r}; not a cvt-flax model.')
  version = doc.get('version')
  if not isinstance(version, int) or version < 1:
    raise CheckpointError(f'{path}: corrupt format version {version!r}.')
  if version > VERSION:
    raise CheckpointError(f'{path}: format version {version} was written by a newer cvt-flax; this '
                          f'one reads up to version {VERSION}. Upgrade cvt-flax.')
  try:
    config = config_from_saved(doc['config'])
    if version == 1:
      return _version_1_defaults(path, config)
    prep = doc.get('preprocess')
    prep = preprocess_lib.Preprocess.from_dict(prep, f'{path} "preprocess"') if prep else None
    names = labels.checked(doc.get('class_names'), config.num_classes, f'{path} "class_names"')
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: invalid model document ({type(e).__name__}: {e}).') from e
  return ModelDoc(config, prep, names)


def _version_1_defaults(path: str, config: CvTConfig) -> ModelDoc:
  names = (labels.imagenet_class_names() if config.num_classes == labels.IMAGENET_NUM_CLASSES
           else None)
  warnings.warn(f'{path}: cvt-flax model format version 1, which records no preprocessing or '
                'class names: using the official ImageNet eval transform at 224 px'
                f'{" and ImageNet class names" if names else ""}; save the model again to write '
                f'version {VERSION}.', FormatNote, stacklevel=4)
  return ModelDoc(config, preprocess_lib.official_eval(224), names)


def save_model(model: CvT, path, *, overwrite: bool = False, preprocess=None,
               class_names=None) -> None:
  """Writes `model` as a model directory (see the module docstring). `preprocess` and
  `class_names` default to the model's own."""
  doc = ModelDoc.of(model, preprocess=preprocess, class_names=class_names)
  weights = {k: np.asarray(jax.device_get(v.get_value())) for k, v in flat_variables(model).items()}
  with files.atomic_directory(path, commit_file=CONFIG_FILE, parts=(STATE_DIR,),
                              overwrite=overwrite) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, STATE_DIR), nest(weights))
      checkpointer.wait_until_finished()
    # config.json last: the directory only looks like a model once complete.
    write_model_doc(os.path.join(tmp, CONFIG_FILE), doc)


def load_model_dir(path: str) -> CvT:
  """The model (eval mode) in a model directory written by `save_model`."""
  path = files.absolute(path)  # Orbax needs absolute paths
  doc = read_model_doc(os.path.join(path, CONFIG_FILE))
  model = abstract_model(doc.config)
  _restore_weights(model, os.path.join(path, STATE_DIR))
  finish_abstract_model(model).eval()
  return doc.apply(model)


def _restore_weights(model: CvT, state_dir: str) -> None:
  """Fills the model from the Orbax state after checking its keys and shapes against the model."""
  expected = flat_variables(model)
  if not files.isdir(state_dir):
    raise CheckpointError(f'{state_dir}: missing; the model has a config but no weights.')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = flatten(checkpointer.metadata(state_dir).item_metadata.tree, sep='.')
      differences = describe_differences(shapes(stored), shapes(expected), found_name='stored',
                                         wanted_name='config needs')
      if differences:
        raise CheckpointError(f'{state_dir}: the stored weights do not match the model in '
                              f'{CONFIG_FILE}:\n  ' + '\n  '.join(differences))
      target = nest({k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
                           for k, v in expected.items()})
      restored = flatten(checkpointer.restore(state_dir, target), sep='.')
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many kinds
    raise CheckpointError(f'{state_dir}: truncated or corrupt Orbax state '
                          f'({type(e).__name__}: {str(e)[:500]}).') from e
  for key, var in expected.items():
    var.set_value(restored[key])
