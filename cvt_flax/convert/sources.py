"""Reading PyTorch-side CvT weights: official `.pth` files and HF checkpoints, as numpy state dicts.

Accepted sources:
  * an official state dict (`torch.save(model.state_dict())`, the released `CvT-*.pth` files);
  * an official training checkpoint: a dict holding the state dict under `state_dict` or `model`,
    keys possibly prefixed `module.` (DistributedDataParallel);
  * an HF checkpoint: a directory with `config.json` and `model.safetensors` or `pytorch_model.bin`,
    or one of those weight files with `config.json` beside it; a `preprocessor_config.json` there
    (the hub repositories have one) says how images are preprocessed.

`.pth`/`.bin` files are read with `torch.load(weights_only=True)` only, so a pickle that would run
code is refused, never executed; torch is imported only for them. safetensors files are read with
`safetensors.numpy`, without torch. The layout (official or HF) is told from the key names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np
import safetensors
import safetensors.numpy

from cvt_flax import errors
from cvt_flax.convert.official import ConversionError

HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
HF_CONFIG_FILE = 'config.json'
HF_PREPROCESSOR_FILE = 'preprocessor_config.json'
# The files a source may consist of (what is copied of a source at a URL).
SOURCE_FILES = HF_WEIGHT_FILES + (HF_CONFIG_FILE, HF_PREPROCESSOR_FILE)
_WRAPPER_KEYS = ('state_dict', 'model')
_DDP_PREFIX = 'module.'
_OFFICIAL_KEY = re.compile(r'^stage\d+\.')
_HF_KEY = re.compile(r'^(cvt\.)?encoder\.stages\.\d+\.')


@dataclasses.dataclass
class Source:
  """Weights read from disk, still under their on-disk names."""
  path: str  # the weights file
  layout: str  # 'official' or 'hf'
  state_dict: dict[str, np.ndarray]
  hf_config: dict | None = None  # the parsed config.json of an HF checkpoint
  hf_preprocessor: dict | None = None  # its parsed preprocessor_config.json, if it has one


def read_source(path: str | os.PathLike) -> Source:
  """Reads any accepted source (see the module docstring); errors name the file and the problem."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory.')
  weights_path, config_path = _locate(path)
  # A directory is an HF checkpoint: its config comes first. Beside a file, a config.json only
  # matters once the keys say HF (an official .pth may sit next to an unrelated one).
  hf_config = read_hf_config(config_path) if os.path.isdir(path) else None
  state_dict = _read_weights(weights_path)
  layout = detect_layout(state_dict, weights_path)
  if layout == 'official':
    return Source(weights_path, 'official', state_dict)
  if config_path is None:
    raise ConversionError(
        f'{weights_path}: HF-layout weights (keys `cvt.encoder.stages...`) need the HF '
        f'`{HF_CONFIG_FILE}` beside them, and there is none in {os.path.dirname(weights_path) or "."}.')
  preprocessor = os.path.join(os.path.dirname(config_path), HF_PREPROCESSOR_FILE)
  return Source(weights_path, 'hf', state_dict, hf_config or read_hf_config(config_path),
                _read_json(preprocessor, 'HF preprocessor config') if os.path.isfile(preprocessor)
                else None)


def _locate(path: str) -> tuple[str, str | None]:
  """(weights file, config.json beside it or None)."""
  if os.path.isdir(path):
    config = os.path.join(path, HF_CONFIG_FILE)
    weights = [os.path.join(path, f) for f in HF_WEIGHT_FILES
               if os.path.isfile(os.path.join(path, f))]
    if not weights:
      raise ConversionError(f'{path}: a directory without {" or ".join(HF_WEIGHT_FILES)}; '
                            'not an HF checkpoint directory.')
    if not os.path.isfile(config):
      raise ConversionError(f'{path}: HF checkpoint directory without {HF_CONFIG_FILE}; the model '
                            'architecture cannot be known without it.')
    return weights[0], config
  config = os.path.join(os.path.dirname(path), HF_CONFIG_FILE)
  return path, config if os.path.isfile(config) else None


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f'{path}: not a readable JSON {what} ({e}).') from e
  if not isinstance(doc, dict):
    raise ConversionError(f'{path}: an {what} must be a JSON object.')
  return doc


def read_hf_config(path: str) -> dict:
  config = _read_json(path, 'HF config')
  if config.get('model_type', 'cvt') != 'cvt':
    raise ConversionError(f'{path}: model_type {config["model_type"]!r}, expected "cvt".')
  return config


def _read_weights(path: str) -> dict[str, np.ndarray]:
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  return _as_state_dict(_torch_load(path), path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return dict(safetensors.numpy.load_file(path))
  except safetensors.SafetensorError as e:
    raise ConversionError(f'{path}: not a valid safetensors file, truncated or corrupted ({e}).') from e


_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80


def _torch_load(path: str) -> Any:
  """torch.load with weights_only=True, turning its errors into messages that say what is wrong."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise ConversionError(f'{path}: empty file, not a PyTorch checkpoint.')
  if not (head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO):
    raise ConversionError(f'{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a '
                          'pickle).')
  torch = errors.require('torch', 'torch')
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'weights only' not in str(e).lower():
      raise ConversionError(f'{path}: corrupted pickle, not a PyTorch checkpoint ({e}).') from e
    found = re.search(r'GLOBAL (\S+)', str(e))
    what = f' it asks for `{found.group(1)}`,' if found else ''
    raise ConversionError(
        f'{path}: refused to load: the file contains pickled code or objects beyond tensors and '
        f'plain containers;{what} which a weights-only load does not allow. A released checkpoint '
        'never needs that (a whole pickled model? save its state_dict() instead); the file may '
        'be malicious. Nothing in it was executed.') from e
  except (RuntimeError, EOFError) as e:
    raise ConversionError(f'{path}: truncated or corrupted PyTorch checkpoint ({e}).') from e
  except Exception as e:  # pylint: disable=broad-except  # torch raises anything on junk bytes
    raise ConversionError(f'{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e}).') from e


def _as_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  """A loaded object -> flat state dict of numpy arrays, unwrapping training checkpoints."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a state dict (a mapping of '
                          'names to tensors).')
  for key in _WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if obj and all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in obj):
    obj = {k[len(_DDP_PREFIX):]: v for k, v in obj.items()}
  torch = errors.require('torch', 'torch')  # imported already by torch.load
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor; not '
                            f'a state dict (top-level keys: {_preview(obj)}).')
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
      value = value.float()
    out[name] = value.detach().cpu().numpy()
  if not out:
    raise ConversionError(f'{path}: an empty state dict.')
  return out


def _preview(keys, n=8) -> str:
  keys = sorted(map(str, keys))
  return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def detect_layout(state_dict: Mapping[str, Any], path: str = 'state dict') -> str:
  """'official' (`stage0.patch_embed...`) or 'hf' (`cvt.encoder.stages.0...`), from the key names."""
  if any(_HF_KEY.match(k) for k in state_dict):
    return 'hf'
  if any(_OFFICIAL_KEY.match(k) for k in state_dict):
    return 'official'
  raise ConversionError(
      f'{path}: unknown key layout: neither official CvT keys (`stage0.patch_embed.proj.weight`...) '
      f'nor HF CvT keys (`cvt.encoder.stages.0...`). Keys: {_preview(state_dict)}.')
