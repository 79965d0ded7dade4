"""Starting a run from existing weights (`config.init_from`): load, check, copy.

Sources: any checkpoint reference (`cvt_flax.io.from_pretrained`): an official/HF PyTorch file or
directory, a hub name (`microsoft/cvt-21-384-22k`), a cvt-flax model directory or a training
workdir (its newest checkpoint). CvT has no position embeddings, so weights carry over to any input
resolution unchanged. A head of a different shape (new classes) is only replaced when the config
says so.
"""
from __future__ import annotations

from cvt_flax import io
from cvt_flax.errors import CvtFlaxError
from cvt_flax.models import CvT
from cvt_flax.models.weights import describe_differences

HEAD_PREFIX = 'head.'


class InitFromError(CvtFlaxError, ValueError):
  """The init_from weights do not fit the model being trained. The message lists the keys."""


def load_source_model(ref: str, spec: str = '') -> CvT:
  """Loads the model to initialise from; the loaders raise clear errors for bad files.

  `spec` (PyTorch sources only): the architecture as `cvt_flax.convert.read_spec` takes it (a
  variant name or a spec/YAML file), for official weights whose spec cannot be inferred.
  """
  try:
    return io.from_pretrained(ref, spec=spec or None)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'init_from: {e}') from e


def select_init_weights(source: dict, target_shapes: dict[str, tuple], *, new_head: bool,
                        source_name: str) -> dict:
  """The source weights to copy into the target, after checking that they fit exactly.

  Every target weight must come from the source with its shape, and every source weight must be
  used, except the head (`head.*`) when `new_head`: then the target keeps its fresh head.
  """
  def kept(keys):
    return {k: keys[k] for k in keys if not (new_head and k.startswith(HEAD_PREFIX))}

  offered = kept({k: tuple(v.shape) for k, v in source.items()})
  wanted = kept({k: tuple(v) for k, v in target_shapes.items()})
  lines = describe_differences(offered, wanted, found_name='checkpoint', wanted_name='model')
  if not lines:
    return {k: source[k] for k in wanted}
  differing = (set(offered) ^ set(wanted)) | {k for k in offered if k in wanted
                                              and offered[k] != wanted[k]}
  if all(k.startswith(HEAD_PREFIX) for k in differing) and not new_head:
    hint = ('Only the classification head differs (other classes?). To train a new head on '
            'purpose set --config.init_new_head=True.')
  else:
    hint = ('The checkpoint is another architecture: check that config.model describes it (or use '
            "config.model.variant='init_from' to take it from the checkpoint).")
  raise InitFromError(f'init_from {source_name} does not fit the model being trained:\n  '
                      + '\n  '.join(lines) + f'\n  {hint}')
