"""Training checkpoints: Orbax CheckpointManager under WORKDIR/checkpoints/<step>/state/.

The train state is stored as a nested dict with string keys (`params/stage0/blocks/0/...`,
`opt_state/0/mu/...`, `rngs/...` as raw uint32 key data), so the files are readable by plain Orbax
without our classes. Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete), so `latest_step()` only ever sees complete checkpoints. Restores take the
target shardings, so a run can resume on a different mesh (another device count, FSDP on or off).
Every process must call `save`, `restore` and `wait` (Orbax synchronises them).
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_ITEM = 'state'


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f'unsupported pytree key {key!r}')


def _is_prng_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data_like(x):
  """The uint32 array (or its abstract shape) that stores a typed PRNG key."""
  if isinstance(x, jax.ShapeDtypeStruct):
    out = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=x.sharding)
  return jax.random.key_data(x)


def _path_names(path) -> list[str]:
  """Pytree path -> key names, without the trailing `.value` of an nnx Variable."""
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == 'value' and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return names


def to_nested_dict(tree: Any) -> dict:
  """Any pytree (nnx.State, optax states, dataclasses) -> nested dict with string keys.

  The `.value` attribute of nnx Variables is dropped from paths; typed PRNG keys become key data.
  """
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = _path_names(path)
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    if names[-1] in node:
      raise ValueError(f'duplicate checkpoint key {"/".join(names)}')
    node[names[-1]] = _key_data_like(leaf) if _is_prng_key(leaf) else leaf
  return out


def from_nested_dict(nested: dict, like: Any) -> Any:
  """Inverse of `to_nested_dict`, given a tree with the target structure (arrays or abstract)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, ref in flat:
    node = nested
    for name in _path_names(path):
      node = node[name]
    leaves.append(jax.random.wrap_key_data(node) if _is_prng_key(ref) else node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
  """Keeps the newest `keep` checkpoints of the train state in `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_ITEM,))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> bool:
    """Starts an asynchronous save (device->host copy happens before returning)."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(to_nested_dict(state))})
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    target = to_nested_dict(abstract_state)
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(target)})
    restored = self._manager.restore(step, args=args)[_ITEM]
    return from_nested_dict(restored, abstract_state)

  def reached_preemption(self, step: int) -> bool:
    """Multi-process: JAX's preemption sync point (all processes agree on the step to stop at)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class StopSignal:
  """Turns SIGTERM (preemption notice) into a flag the training loop polls between steps.

  With several processes, JAX's distributed runtime already catches SIGTERM and its preemption
  sync point makes every process stop at the same step; this handler is for a single process.
  """

  def __init__(self):
    self._event = threading.Event()
    self._installed = (jax.process_count() == 1
                       and threading.current_thread() is threading.main_thread())
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  def should_stop(self, checkpointer: Checkpointer, step: int) -> bool:
    if jax.process_count() > 1:
      return checkpointer.reached_preemption(step)
    return self._event.is_set()

  def restore_handler(self) -> None:
    if self._installed:
      # None means a handler not installed from Python; the default action is the closest.
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (process 0 only should call it)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# A training workdir as a model: WORKDIR/model_config.json + the newest checkpoint's weights.

MODEL_CONFIG_FILE = 'model_config.json'


def write_model_config(workdir: str, model_config) -> None:
  """WORKDIR/model_config.json, the same document as a saved model's config.json."""
  from cvt_flax import checkpoint  # pylint: disable=g-import-not-at-top
  write_json(os.path.join(workdir, MODEL_CONFIG_FILE),
             {'format': checkpoint.FORMAT, 'version': checkpoint.VERSION,
              'config': model_config.to_dict()})


def read_model_config(workdir: str):
  """The CvTConfig saved in a training workdir."""
  from cvt_flax import checkpoint  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  try:
    with open(path) as f:
      doc = json.load(f)
    if doc.get('format') != checkpoint.FORMAT:
      raise ValueError(f'format {doc.get("format")!r}, expected {checkpoint.FORMAT!r}')
    if doc.get('version', 0) > checkpoint.VERSION:
      raise ValueError(f'version {doc["version"]} was written by a newer cvt-flax '
                       f'(this one reads up to {checkpoint.VERSION})')
    from cvt_flax.models import make_config  # pylint: disable=g-import-not-at-top
    return make_config(doc['config'])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path}: not a readable model config: {e}') from e


def load_model_from_workdir(workdir: str, step: int | None = None):
  """The model (eval mode) of a training workdir at `step` (default: its newest checkpoint).

  Restores only the weights (params and BatchNorm statistics), not the optimizer state.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cvt_flax.models import CvT  # pylint: disable=g-import-not-at-top
  model_config = read_model_config(workdir)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=(_ITEM,))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}: no complete checkpoint under {directory}.')
  model = CvT(model_config, rngs=nnx.Rngs(0))
  params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {'params': to_nested_dict(params), 'batch_stats': to_nested_dict(stats)}
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
  args = ocp.args.Composite(**{_ITEM: ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)})
  restored = manager.restore(step, args=args)[_ITEM]
  manager.close()
  nnx.update(model, from_nested_dict(restored['params'], params),
             from_nested_dict(restored['batch_stats'], stats))
  model.eval()
  return model
