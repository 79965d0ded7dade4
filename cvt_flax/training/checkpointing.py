"""Training checkpoints: Orbax CheckpointManager under WORKDIR/checkpoints/<step>/state/.

The train state is stored as a nested dict with string keys (`params/stage0/blocks/0/...`,
`opt_state/0/mu/...`, `rngs/...` as raw uint32 key data), so the files are readable by plain Orbax
without our classes. Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete), so `latest_step()` only ever sees complete checkpoints. Restores take the
target shardings, so a run can resume on a different mesh (another device count, FSDP on or off).
Every process must call `save`, `restore` and `wait` (Orbax synchronises them).

Failures: a save that fails (disk full, permissions) raises `CheckpointSaveError` naming the step
and the newest complete checkpoint, which is left untouched (old checkpoints are only deleted after
a newer one is complete). A checkpoint that cannot be restored (truncated, corrupt, another
model's) raises `CheckpointRestoreError` naming it, with the keys/shapes that differ if the layout
does not match. A save killed mid-way leaves only `<step>.orbax-checkpoint-tmp`, which is never
read and which the next run deletes when it opens the directory (synchronously: Orbax's own
background cleanup raced with other readers of the directory). `complete_steps` lists the
checkpoints without deleting anything.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_ITEM = 'state'


class CheckpointSaveError(RuntimeError):
  """Writing a training checkpoint failed; the message names the step and the newest good one."""


class CheckpointRestoreError(ValueError):
  """A training checkpoint cannot be restored; the message names it and what is wrong."""


class WorkdirError(OSError):
  """The workdir cannot be written, or has too little free space for a checkpoint."""


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


_INCOMPLETE_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's name for a save not yet renamed


def _remove_incomplete_saves(directory: str) -> None:
  """Deletes `<step>.orbax-checkpoint-tmp` directories: saves that were killed, never checkpoints.

  Without this they would pile up on disk. Run before the manager exists, so nothing else in this
  process is reading the directory.
  """
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if _INCOMPLETE_SUFFIX in name:
      shutil.rmtree(os.path.join(directory, name))


def complete_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, oldest first; deletes nothing."""
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return list(manager.all_steps())
  finally:
    manager.close()


class Checkpointer:
  """Keeps the newest `keep` checkpoints of the train state in `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      _remove_incomplete_saves(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # The handler is named up front so that a checkpoint's metadata is readable before restoring.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers={_ITEM: ocp.StandardCheckpointHandler()})
    self._pending_step = None  # the newest save started; complete once `wait` returns
    self._failure_reported = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> bool:
    """Starts an asynchronous save (device->host copy happens before returning).

    Raises CheckpointSaveError if this save, or the previous asynchronous one, failed.
    """
    if step in self._manager.all_steps():
      return False
    self.wait()  # a failed earlier save is reported here, under its own step
    self._pending_step = step
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(to_nested_dict(state))})
    try:
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except  # OSError, tensorstore errors, ...
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
    self._failure_reported = True
    self._manager.reload()  # the step list as on disk, not as this manager last saw it
    complete = [s for s in self._manager.all_steps() if s != step]
    newest = f'step {complete[-1]}' if complete else 'none (no checkpoint was completed)'
    return CheckpointSaveError(
        f'Saving the training checkpoint of step {step} in {self.directory} failed: '
        f'{type(error).__name__}: {error}. Training stopped. The newest complete checkpoint is '
        f'{newest}; it was not modified. Free disk space or fix the directory\'s permissions, '
        'then rerun the same command to resume from it.')

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

    The stored layout is compared with `abstract_state` first, so a checkpoint of another model or
    train-state layout fails with the differing keys; unreadable data fails naming the checkpoint.
    """
    target = to_nested_dict(abstract_state)
    try:
      stored = self._manager.item_metadata(step)[_ITEM]
    except Exception as e:  # pylint: disable=broad-except  # JSON, tensorstore, OS errors
      raise self._restore_error(step, f'its metadata is unreadable, the checkpoint is truncated or '
                                      f'corrupt ({_short(e)})') from e
    differences = _layout_differences(stored, target) if stored is not None else ['no train state']
    if differences:
      raise self._restore_error(step, 'it does not hold the train state this config needs:\n  '
                                + '\n  '.join(differences))
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(target)})
    try:
      restored = self._manager.restore(step, args=args)[_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise self._restore_error(step, f'its data is truncated or corrupt ({_short(e)})') from e
    return from_nested_dict(restored, abstract_state)

  def _restore_error(self, step: int, why: str) -> CheckpointRestoreError:
    path = os.path.join(self.directory, str(step))
    older = [s for s in self._manager.all_steps() if s < step]
    action = (f'Move it out of the way (mv {path} {path}.bad) to resume from step {older[-1]}, or '
              if older else '') + 'use a new workdir.'
    return CheckpointRestoreError(f'{path}: cannot restore the training checkpoint of step {step}: '
                                  f'{why}\n{action}')

  def reached_preemption(self, step: int) -> bool:
    """Multi-process: JAX's preemption sync point (all processes agree on the step to stop at)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the pending save is complete; raises CheckpointSaveError (once) if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not self._failure_reported:
        raise self._save_error(self._pending_step, e) from e

  def close(self) -> None:
    self.wait()
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failure_reported:  # a failure already reported is raised again by Orbax
        raise


def _short(error: Exception, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if len(text) <= limit else text[:limit] + '...'


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  return {'/'.join(_path_names(path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layout_differences(stored: Any, target: Any) -> list[str]:
  """Missing / unexpected keys and shape mismatches between stored metadata and a target tree."""
  have, want = _flat_shapes(stored), _flat_shapes(target)
  shapes = [f'{k}: checkpoint {have[k]}, expected {want[k]}'
            for k in have.keys() & want.keys() if have[k] != want[k]]
  out = []
  for title, items in (('missing keys', want.keys() - have.keys()),
                       ('unexpected keys', have.keys() - want.keys()),
                       ('shape mismatches', shapes)):
    if items:
      out.append(f'{title} ({len(items)}): {_sample(items)}')
  return out


def _sample(items, per_group: int = 4) -> str:
  """A few items of each top-level group (params first), so that long lists stay readable."""
  groups: dict[str, list[str]] = {}
  for item in sorted(items, key=lambda k: (not k.startswith('params/'), k)):
    groups.setdefault(item.split('/')[0], []).append(item)
  shown = [item for group in groups.values() for item in group[:per_group]]
  return '; '.join(shown) + (f'; ... ({len(items)} in all)' if len(shown) < len(items) else '')


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


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and writes (then removes) a probe file in it, so that an unwritable
  directory fails before any data is read or anything is compiled."""
  if '://' in workdir:
    # os.makedirs would silently create a *local* directory named like the URL, and everything
    # (checkpoints too) would be written to the machine's disk, lost with it.
    raise WorkdirError(f'workdir {workdir}: remote URLs are not supported; metrics, configs and '
                       'checkpoints are written with local file APIs. Use a local or mounted path '
                       '(e.g. a gcsfuse mount).')
  probe = os.path.join(workdir, f'.write_probe.{jax.process_index()}.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    try:
      with open(probe, 'wb') as f:
        f.write(b'cvt-flax write probe\n')
        f.flush()
        os.fsync(f.fileno())  # a full disk may only fail here
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir} is not writable: {e.strerror or e} '
                       f'({type(e).__name__}); checkpoints and metrics could not be saved. Use '
                       'another --workdir or fix its permissions / free space.') from e


def state_nbytes(abstract_state: Any) -> int:
  """Bytes of the arrays in a train state (about the size of one checkpoint on disk)."""
  leaves = jax.tree.leaves(to_nested_dict(abstract_state))
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def check_free_space(directory: str, needed_bytes: int) -> None:
  """Fails before training if the disk holding `directory` cannot take one more checkpoint."""
  free = shutil.disk_usage(directory).free
  if free < needed_bytes:
    mib = 2 ** 20
    raise WorkdirError(f'{directory}: only {free / mib:.1f} MiB free on its disk, but a '
                       f'checkpoint of this run takes about {needed_bytes / mib:.1f} MiB. Free '
                       'disk space or use another --workdir.')


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
    raise CheckpointRestoreError(f'{path}: not a readable model config: {e}') from e


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
  try:
    restored = manager.restore(step, args=args)[_ITEM]
  except Exception as e:  # pylint: disable=broad-except  # tensorstore, JSON, OS, shape errors
    raise CheckpointRestoreError(f'{os.path.join(directory, str(step))}: cannot restore the model '
                                 f'weights of step {step}: truncated, corrupt or another model\'s '
                                 f'checkpoint ({_short(e)}).') from e
  finally:
    manager.close()
  nnx.update(model, from_nested_dict(restored['params'], params),
             from_nested_dict(restored['batch_stats'], stats))
  model.eval()
  return model
