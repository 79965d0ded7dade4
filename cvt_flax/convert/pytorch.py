"""PyTorch-side CvT weights <-> Flax CvT: `load_pytorch`, `save_official`, `save_hf`."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
import yaml

from cvt_flax import errors, files, labels, preprocess
from cvt_flax.convert import hf, infer, sources
from cvt_flax.convert.official import (ConversionError, load_official_state_dict,
                                       to_official_state_dict)
from cvt_flax.models import (CvT, CvTConfig, abstract_model, configs_from_official_yaml,
                             finish_abstract_model, make_config)
from cvt_flax.models.config import config_from_saved

DEFAULT_ACTIVATION = {'official': 'quick_gelu', 'hf': 'gelu'}
# The released files are named for their resolution: CvT-21-384x384-IN-22k.pth.
_RESOLUTION_IN_NAME = re.compile(r'(?<!\d)(\d{3})x\1(?!\d)')


def read_spec(spec: Any) -> CvTConfig:
  """A model spec as the user gives it -> CvTConfig.

  Accepts a CvTConfig, a variant name ('cvt-13'), a dict (official SPEC with upper-case keys, or
  CvTConfig fields), or a file: an official experiment YAML (`MODEL.SPEC`), or JSON holding a SPEC
  dict, `{"spec": SPEC, ...}` (the fixtures' format), `{"MODEL": {"SPEC": ...}}`, or a cvt-flax
  model `config.json` (`{"config": fields}`).
  """
  if isinstance(spec, CvTConfig):
    return spec
  if isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
    return _read_spec_file(os.fspath(spec))
  try:
    return make_config(spec)
  except (ValueError, TypeError) as e:
    raise ConversionError(f'spec {spec!r}: {e}') from e


def _read_spec_file(path: str) -> CvTConfig:
  try:
    if path.endswith(('.yaml', '.yml')):
      return configs_from_official_yaml(path)
    with open(path) as f:
      doc = json.load(f)
    if isinstance(doc, dict) and 'MODEL' in doc:
      fields = dict(doc['MODEL']['SPEC'])
      if 'NUM_CLASSES' in doc['MODEL']:
        fields['num_classes'] = doc['MODEL']['NUM_CLASSES']
      return make_config(fields)
    if isinstance(doc, dict) and isinstance(doc.get('spec'), dict):
      return make_config(doc['spec'])
    if isinstance(doc, dict) and isinstance(doc.get('config'), dict):  # a cvt-flax config.json
      return config_from_saved(doc['config'])
    return make_config(doc)
  except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
    raise ConversionError(f'spec file {path}: not a CvT spec ({type(e).__name__}: {e}).') from e


def _with_batch_counts(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Adds `num_batches_tracked` = 0 where a BatchNorm lacks it (older checkpoints; torch does the
  same in BatchNorm._load_from_state_dict). It does not affect inference."""
  out = dict(state_dict)
  for key in state_dict:
    if key.endswith('.running_mean'):
      out.setdefault(key[:-len('running_mean')] + 'num_batches_tracked', np.zeros((), np.int64))
  return out


def _config_for(src: sources.Source, state_dict, spec, num_classes, activation) -> CvTConfig:
  if spec is not None:
    cfg = read_spec(spec)
    explicit = isinstance(spec, CvTConfig)  # only a full config carries classes and activation
  elif src.layout == 'hf':
    cfg, explicit = hf.config_from_hf(src.hf_config, source=src.path), True
  else:
    cfg, explicit = infer.infer_config(state_dict, source=src.path), False
  overrides = {}
  if num_classes is not None:
    overrides['num_classes'] = num_classes
  elif not explicit:
    overrides['num_classes'] = infer.num_classes_of(state_dict)
  if activation is not None:
    overrides['activation'] = activation
  elif not explicit:
    overrides['activation'] = DEFAULT_ACTIVATION[src.layout]
  try:
    return dataclasses.replace(cfg, **overrides).validate()
  except ValueError as e:
    raise ConversionError(f'{src.path}: {e}') from e


def source_preprocess(src: sources.Source, image_size: int | None = None) -> preprocess.Preprocess:
  """The eval transform the source's model was evaluated with.

  HF: its preprocessor_config.json. Official files carry none: the official evaluation at the
  resolution in the released file names ('...-384x384-...'), else 224. `image_size` overrides the
  resolution (the official rule then decides crop or warp).
  """
  if src.layout == 'hf' and src.hf_preprocessor is not None and image_size is None:
    try:
      return preprocess.from_hf_processor(src.hf_preprocessor, source=src.path)
    except preprocess.PreprocessError as e:
      raise ConversionError(str(e)) from e
  found = _RESOLUTION_IN_NAME.search(os.path.basename(src.path))
  return preprocess.official_eval(image_size or (int(found.group(1)) if found else 224))


def source_class_names(src: sources.Source, num_classes: int) -> tuple[str, ...] | None:
  """HF: its id2label; official: ImageNet-1k's names for a 1000-class head."""
  if src.layout == 'hf':
    return labels.from_id2label(src.hf_config.get('id2label'), num_classes)
  return labels.imagenet_class_names() if num_classes == labels.IMAGENET_NUM_CLASSES else None


def load_pytorch(path, *, spec=None, num_classes: int | None = None,
                 activation: str | None = None, image_size: int | None = None) -> CvT:
  """Loads official or HF PyTorch CvT weights into a Flax CvT, in eval mode, with the source's
  preprocessing and class names (`source_preprocess`, `source_class_names`).

  `path`: an official `.pth` (state dict or training checkpoint), an HF checkpoint directory, or an
  HF weights file with its config.json beside it (see `cvt_flax.convert.sources`).
  `spec`: the architecture (see `read_spec`); by default it comes from the HF config.json or is
  inferred from the official weights (see `cvt_flax.convert.infer`).
  `num_classes`: defaults to the weights' head; 0 drops the head (a pre-logits feature model).
  `activation`: defaults to 'quick_gelu' for official weights and 'gelu' for HF ones.
  `image_size`: the evaluation resolution, where the source does not say it.

  Strict: every tensor must be used and fit; otherwise a ConversionError lists the keys, and no
  model is returned.
  """
  src = sources.read_source(path)
  state = src.state_dict
  if src.layout == 'hf':
    state = hf.hf_to_official_state_dict(state, source=src.path)
  state = _with_batch_counts(state)
  cfg = _config_for(src, state, spec, num_classes, activation)
  if cfg.num_classes == 0:
    state = {k: v for k, v in state.items() if not k.startswith('head.')}
  model = abstract_model(cfg)
  load_official_state_dict(model, state, source=src.path)
  finish_abstract_model(model)
  model.eval()
  model.preprocess = source_preprocess(src, image_size)
  model.class_names = source_class_names(src, cfg.num_classes)
  return model


def save_official(model: CvT, path) -> None:
  """Writes the official layout `.pth`: `torch.save` of a state dict of tensors (needs torch), in
  the official module order, like the released files."""
  torch = errors.require('torch', 'torch')
  reference = errors.require('cvt_flax.convert.torch_reference', 'torch')
  with torch.device('meta'):  # key order only, no memory
    order = list(reference.build_reference_model(model.config).state_dict())
  arrays = to_official_state_dict(model)
  if sorted(order) != sorted(arrays):
    raise ConversionError('internal: the Flax model and the official layout disagree on keys: '
                          f'{sorted(set(order) ^ set(arrays))}')
  state = {k: torch.from_numpy(np.array(arrays[k], order='C')) for k in order}
  files.atomic_write(os.fspath(path), lambda tmp: torch.save(state, tmp))


def save_hf(model: CvT, directory, *, id2label: Mapping[int, str] | None = None) -> None:
  """Writes an HF checkpoint directory (`config.json` + `model.safetensors`, and the model's
  preprocessing as `preprocessor_config.json` where HF's processor can express it), without torch.
  `id2label` defaults to the model's class names."""
  directory = os.fspath(directory)
  if id2label is None and model.class_names:
    id2label = dict(enumerate(model.class_names))
  config = hf.config_to_hf(model.config, id2label)
  tensors = {k: np.array(v, order='C') for k, v in
             hf.official_to_hf_state_dict(to_official_state_dict(model)).items()}
  files.makedirs(directory)
  # 'format': 'pt' is what transformers checks before loading a safetensors file as PyTorch weights.
  files.atomic_write(os.path.join(directory, 'model.safetensors'), lambda tmp:
                     safetensors.numpy.save_file(tensors, tmp, metadata={'format': 'pt'}))
  files.write_json(os.path.join(directory, sources.HF_CONFIG_FILE), config, sort_keys=True)
  if model.preprocess is not None:
    try:
      processor = preprocess.to_hf_processor(model.preprocess)
    except preprocess.PreprocessError as e:
      warnings.warn(f'{directory}: no {sources.HF_PREPROCESSOR_FILE} written: {e}')
    else:
      files.write_json(os.path.join(directory, sources.HF_PREPROCESSOR_FILE), processor,
                       sort_keys=True)
