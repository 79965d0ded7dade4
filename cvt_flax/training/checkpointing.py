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

On Cloud Storage (a `gs://` workdir) Orbax writes `<step>/` in place and marks it complete with
`<step>/commit_success.txt` last; a step without it is never listed or restored, and the next run
deletes it the same way. There is no free-space figure there: the workdir probe (a write and a
delete) is the test.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cvt_flax import files
from cvt_flax.errors import CvtFlaxError
from cvt_flax.io.workdir import STATE_ITEM as _ITEM, read_only_manager
from cvt_flax.models.weights import (describe_differences, flatten, from_nested_dict, shapes,
                                     to_nested_dict)


class CheckpointSaveError(CvtFlaxError, RuntimeError):
  """Writing a training checkpoint failed; the message names the step and the newest good one."""


class CheckpointRestoreError(CvtFlaxError, ValueError):
  """A training checkpoint cannot be restored; the message names it and what is wrong."""


class WorkdirError(CvtFlaxError, OSError):
  """The workdir cannot be written, or has too little free space for a checkpoint."""


_INCOMPLETE_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's name for a save not yet renamed
_COMMIT_FILE = 'commit_success.txt'  # written last into a step on Cloud Storage, which cannot rename


def _is_incomplete_save(directory: str, name: str) -> bool:
  if _INCOMPLETE_SUFFIX in name:
    return True
  return (files.is_remote(directory) and name.isdigit()
          and not files.exists(os.path.join(directory, name, _COMMIT_FILE)))


def _remove_incomplete_saves(directory: str) -> None:
  """Deletes the saves that were killed (never checkpoints; see the module docstring).

  Without this they would pile up. Run before the manager exists, so nothing else in this process
  is reading the directory.
  """
  if not files.isdir(directory):
    return
  for name in files.listdir(directory):
    if _is_incomplete_save(directory, name):
      files.rmtree(os.path.join(directory, name))


def complete_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, oldest first; deletes nothing."""
  manager = read_only_manager(directory)
  try:
    return list(manager.all_steps())
  finally:
    manager.close()


class Checkpointer:
  """Keeps the newest `keep` checkpoints of the train state in `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = files.absolute(directory)
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
    try:
      self._manager.reload()  # the step list as on disk, not as this manager last saw it
    except Exception:  # pylint: disable=broad-except  # the storage itself may be what failed
      pass  # then the list as this manager last saw it
    complete = [s for s in self._manager.all_steps() if s != step]
    newest = f'step {complete[-1]}' if complete else 'none (no checkpoint was completed)'
    return CheckpointSaveError(
        f'Saving the training checkpoint of step {step} in {self.directory} failed: '
        f'{type(error).__name__}: {error}. Training stopped. The newest complete checkpoint is '
        f'{newest}; it was not modified. {_fix(self.directory)}, then rerun the same command '
        'to resume from it.')

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
    mv = 'gcloud storage mv' if files.is_remote(path) else 'mv'
    action = (f'Move it out of the way ({mv} {path} {path}.bad) to resume from step {older[-1]}, or '
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


def _fix(directory: str) -> str:
  if files.is_remote(directory):
    return 'Check that the bucket is reachable and writable by this machine'
  return 'Free disk space or fix the directory\'s permissions'


def _short(error: Exception, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if len(text) <= limit else text[:limit] + '...'


def _layout_differences(stored: Any, target: Any) -> list[str]:
  """Missing / unexpected keys and shape mismatches between stored metadata and a target tree
  (a few keys of each top-level group: params/, opt_state/, ...)."""
  return describe_differences(shapes(flatten(stored)), shapes(flatten(target)),
                              found_name='checkpoint', wanted_name='expected', limit=4,
                              group_sep='/')


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


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and writes (then removes) a probe file in it, so that an unwritable
  directory (or a missing bucket) fails before any data is read or anything is compiled."""
  probe = os.path.join(workdir, f'.write_probe.{jax.process_index()}.{os.getpid()}')
  if files.is_remote(workdir):
    _probe_remote(workdir, probe)
    return
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


def remove_unused_workdir(workdir: str) -> None:
  """Removes a local `workdir` that holds no file (only the empty directories a run that never
  started made): a failed first command leaves no trace. A bucket's empty prefixes do not exist."""
  if files.is_remote(workdir) or not os.path.isdir(workdir) or jax.process_index() != 0:
    return
  if not any(names for _, _, names in os.walk(workdir)):
    shutil.rmtree(workdir, ignore_errors=True)


def _probe_remote(workdir: str, probe: str) -> None:
  try:
    files.write_text(probe, 'cvt-flax write probe\n')
    files.remove(probe)
  except CvtFlaxError:
    raise  # a missing extra says so itself
  except Exception as e:  # pylint: disable=broad-except  # gcsfs: OSError, HttpError, auth errors
    cause = ' '.join(str(e).split())[:300].rstrip('.')
    raise WorkdirError(f'workdir {workdir} is not writable: {type(e).__name__}: {cause}. Check '
                       'that the bucket exists and that this machine\'s service account may '
                       'create and delete objects in it (or use another --workdir).') from e


def state_nbytes(abstract_state: Any) -> int:
  """Bytes of the arrays in a train state (about the size of one checkpoint on disk)."""
  leaves = jax.tree.leaves(to_nested_dict(abstract_state))
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def check_free_space(directory: str, needed_bytes: int) -> None:
  """Fails before training if the disk holding `directory` cannot take one more checkpoint
  (Cloud Storage has no such figure: nothing to check)."""
  if files.is_remote(directory):
    return
  free = shutil.disk_usage(directory).free
  if free < needed_bytes:
    mib = 2 ** 20
    raise WorkdirError(f'{directory}: only {free / mib:.1f} MiB free on its disk, but a '
                       f'checkpoint of this run takes about {needed_bytes / mib:.1f} MiB. Free '
                       'disk space or use another --workdir.')
