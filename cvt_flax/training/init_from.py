"""Starting a run from existing weights (`config.init_from`): load, check, copy.

Sources: an official/HF PyTorch file or directory (`cvt_flax.convert.load_pytorch`), a converted
model directory (`cvt_flax.checkpoint.load_checkpoint`) or one of our training workdirs (its newest
checkpoint). CvT has no position embeddings, so weights carry over to any input resolution
unchanged. A head of a different shape (new classes) is only replaced when the config says so.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from cvt_flax.models import CvT

_HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
HEAD_PREFIX = 'head.'


class InitFromError(ValueError):
  """The init_from weights do not fit the model being trained. The message lists the keys."""


def load_source_model(path: str, spec: str = '') -> CvT:
  """Loads the model to initialise from; the loaders raise clear errors for bad files.

  `spec` (PyTorch sources only): the architecture as `cvt_flax.convert.read_spec` takes it (a
  variant name or a spec/YAML file), for official weights whose spec cannot be inferred.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_from: {path} does not exist.')
  is_hf_dir = os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, f)) for f in _HF_WEIGHT_FILES)
  if is_hf_dir or os.path.isfile(path):
    from cvt_flax.convert import load_pytorch  # pylint: disable=g-import-not-at-top
    return load_pytorch(path, spec=spec or None)
  # A converted model directory, or a training workdir (load_checkpoint reads both).
  from cvt_flax.checkpoint import load_checkpoint  # pylint: disable=g-import-not-at-top
  return load_checkpoint(path)


def flat_weights(model: nnx.Module) -> dict[str, object]:
  """'stage0.blocks.0.attn.proj_q.kernel' -> value (array, or ShapeDtypeStruct for an abstract
  model) of every nnx.Param and nnx.BatchStat."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'.'.join(str(p) for p in path): var.value for path, var in nnx.to_flat_state(state)}


def host_weights(model: nnx.Module) -> dict[str, np.ndarray]:
  """`flat_weights` as numpy arrays on the host (safe to pass to a jit over any mesh)."""
  return {k: np.asarray(jax.device_get(v)) for k, v in flat_weights(model).items()}


def select_init_weights(source: dict[str, np.ndarray], target_shapes: dict[str, tuple], *,
                        new_head: bool, source_name: str) -> dict[str, np.ndarray]:
  """The source weights to copy into the target, after checking that they fit exactly.

  Every target weight must come from the source with its shape, and every source weight must be
  used, except the head (`head.*`) when `new_head`: then the target keeps its fresh head.
  """
  def is_head(key):
    return key.startswith(HEAD_PREFIX)

  wanted = {k for k in target_shapes if not (new_head and is_head(k))}
  offered = {k for k in source if not (new_head and is_head(k))}
  missing, unexpected = sorted(wanted - offered), sorted(offered - wanted)
  shapes = sorted(f'{k}: checkpoint {tuple(source[k].shape)}, model {tuple(target_shapes[k])}'
                  for k in wanted & offered if tuple(source[k].shape) != tuple(target_shapes[k]))
  if not (missing or unexpected or shapes):
    return {k: source[k] for k in wanted}
  lines = [f'init_from {source_name} does not fit the model being trained:']
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches', shapes)):
    if items:
      lines.append(f'  {title} ({len(items)}): ' + '; '.join(items))
  only_head = all(is_head(item) for item in missing + unexpected + shapes)
  if only_head and not new_head:
    lines.append('  Only the classification head differs (other classes?). To train a new head on '
                 'purpose set --config.init_new_head=True.')
  else:
    lines.append('  Check that config.model describes the same architecture as the checkpoint '
                 "(or use config.model.variant='init_from' to take it from the checkpoint).")
  raise InitFromError('\n'.join(lines))
