"""Model checkpoints: a Flax CvT's weights and config in a directory, for inference or fine-tuning.

Layout of `save_model(model, path)`:
  path/config.json   {"format": "cvt_flax.model", "version": 1, "config": CvTConfig.to_dict()}
  path/state/        Orbax checkpoint of the nnx.Param and nnx.BatchStat values, a nested dict
                     with string keys following the attribute paths (`stage0/blocks/0/attn/...`).

A save writes everything into a temporary sibling directory and renames it into place as the last
step, so an interrupted save leaves no directory that loads as a checkpoint. Single-process use
(converted or exported models); training runs checkpoint through `cvt_flax.training`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cvt_flax.convert.official import abstract_model, finish_abstract_model
from cvt_flax.models import CvT, CvTConfig, make_config

FORMAT = 'cvt_flax.model'
VERSION = 1
CONFIG_FILE = 'config.json'
STATE_DIR = 'state'
# A training workdir (written by cvt_flax.training): WORKDIR/model_config.json + checkpoints/<step>/.
WORKDIR_MODEL_CONFIG = 'model_config.json'
WORKDIR_CHECKPOINTS = 'checkpoints'


class CheckpointError(ValueError):
  """A directory is not a loadable model checkpoint; the message says which file and why."""


def _weights(model: nnx.Module) -> dict[str, Any]:
  """'stage0.blocks.0.attn.proj_q.kernel' -> Variable, for every nnx.Param and nnx.BatchStat."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'.'.join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _flatten(tree) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'.'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}


def save_model(model: CvT, path, *, overwrite: bool = False) -> None:
  """Writes `model`'s config and weights to the directory `path` (see the module docstring)."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it.')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  weights = {k: np.asarray(jax.device_get(v.get_value())) for k, v in _weights(model).items()}
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, STATE_DIR), _nest(weights))
      checkpointer.wait_until_finished()
    # config.json last: even the temporary directory only looks like a checkpoint once complete.
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump({'format': FORMAT, 'version': VERSION, 'config': model.config.to_dict()}, f,
                indent=2)
    _move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, path: str) -> None:
  if not os.path.exists(path):
    os.rename(tmp, path)
    return
  # Replacing: move the old one aside first (a directory cannot be renamed over a non-empty one).
  trash = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f'.{os.path.basename(path)}.old-')
  os.rename(path, os.path.join(trash, 'old'))
  os.rename(tmp, path)
  shutil.rmtree(trash, ignore_errors=True)


def read_model_config(path: str) -> CvTConfig:
  """The CvTConfig in `path/config.json`, checking format and version."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f'{path}: no {CONFIG_FILE}; not a cvt-flax model checkpoint (an '
                          'unfinished save leaves none).')
  try:
    with open(config_path) as f:
      doc = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{config_path}: corrupt, not valid JSON ({e}).') from e
  if not isinstance(doc, dict) or doc.get('format') != FORMAT:
    found = doc.get('format') if isinstance(doc, dict) else type(doc).__name__
    raise CheckpointError(f'{config_path}: format {found!r}, expected {FORMAT!r}; not a cvt-flax '
                          'model checkpoint.')
  version = doc.get('version')
  if not isinstance(version, int) or version < 1:
    raise CheckpointError(f'{config_path}: corrupt format version {version!r}.')
  if version > VERSION:
    raise CheckpointError(f'{config_path}: format version {version} was written by a newer '
                          f'cvt-flax; this one reads up to version {VERSION}. Upgrade cvt-flax.')
  try:
    return make_config(doc['config'])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{config_path}: invalid model config ({type(e).__name__}: {e}).') from e


def _restore_weights(model: CvT, state_dir: str) -> None:
  """Fills the model from the Orbax state after checking its keys and shapes against the model."""
  expected = _weights(model)
  if not os.path.isdir(state_dir):
    raise CheckpointError(f'{state_dir}: missing; the checkpoint has a config but no weights.')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = _flatten(checkpointer.metadata(state_dir).item_metadata.tree)
      _check_matches(stored, expected, state_dir)
      target = _nest({k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
                      for k, v in expected.items()})
      restored = _flatten(checkpointer.restore(state_dir, target))
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many kinds
    raise CheckpointError(f'{state_dir}: truncated or corrupt Orbax state '
                          f'({type(e).__name__}: {str(e)[:500]}).') from e
  for key, var in expected.items():
    var.set_value(restored[key])


def _check_matches(stored: dict[str, Any], expected: dict[str, Any], state_dir: str) -> None:
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  shapes = sorted(f'{k}: stored {tuple(stored[k].shape)}, '
                  f'config needs {tuple(expected[k].get_value().shape)}'
                  for k in set(stored) & set(expected)
                  if tuple(stored[k].shape) != tuple(expected[k].get_value().shape))
  if not (missing or unexpected or shapes):
    return
  lines = [f'{state_dir}: the stored weights do not match the model in config.json:']
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches', shapes)):
    if items:
      lines.append(f'  {title} ({len(items)}): ' + '; '.join(items))
  raise CheckpointError('\n'.join(lines))


def is_training_workdir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, WORKDIR_MODEL_CONFIG))
          and os.path.isdir(os.path.join(path, WORKDIR_CHECKPOINTS)))


def load_checkpoint(path) -> CvT:
  """Loads a model checkpoint written by `save_model` (or a training workdir), in eval mode."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    what = 'does not exist' if not os.path.exists(path) else 'is not a directory'
    raise CheckpointError(f'{path} {what}; a cvt-flax model checkpoint is a directory with '
                          f'{CONFIG_FILE} and {STATE_DIR}/.')
  if not os.path.exists(os.path.join(path, CONFIG_FILE)) and is_training_workdir(path):
    # HOOK: training workdirs (WORKDIR/model_config.json + checkpoints/<step>/) are read by the
    # training code, which owns that layout; imported lazily to keep models <- training direction.
    from cvt_flax.training.checkpointing import load_model_from_workdir  # pylint: disable=g-import-not-at-top
    model = load_model_from_workdir(path)
  else:
    model = abstract_model(read_model_config(path))
    _restore_weights(model, os.path.join(path, STATE_DIR))
    finish_abstract_model(model)
  model.eval()
  return model
