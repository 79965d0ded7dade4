"""Bad checkpoints, untrusted weights, NaN gradients, unwritable or full disks: clear errors, and
the newest complete checkpoint always survives."""
import errno
import json
import os
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from orbax.checkpoint._src.path import atomicity

from cvt_flax.training import loop
from cvt_flax.convert import ConversionError
from cvt_flax.io import CheckpointError
from cvt_flax.models.weights import to_nested_dict
from cvt_flax.models import CvT
from cvt_flax.training import checkpointing
from cvt_flax.training.checkpointing import (Checkpointer, CheckpointRestoreError, complete_steps,
                                             CheckpointSaveError, WorkdirError)
from cvt_flax.training.run import build_run, create_initial_state, write_run_files
from helpers import DATA, WHITE, tiny_config, train_losses, white_images_at_step

# Orbax's async machinery reports 'Event loop is closed' from finalisers after a failure.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _steps(workdir) -> list[int]:
  return complete_steps(os.path.join(workdir, 'checkpoints'))


# ----------------------------------------------------------------------------------------------------
# 3. Checkpoints that are truncated, of another model, or of a newer format.

def test_truncated_newest_checkpoint_is_named_and_the_older_one_resumes(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir)  # 6 steps, checkpoints at 3 and 6
  workdir = str(tmp_path)
  loop.train_and_evaluate(cfg, workdir)
  full = train_losses(workdir)
  newest = os.path.join(workdir, 'checkpoints', '6')
  for parent, _, names in os.walk(newest):
    for name in names:
      path = os.path.join(parent, name)
      if os.path.getsize(path) > 1000:  # the array data and metadata files
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 3)
  with pytest.raises(CheckpointRestoreError) as err:
    loop.train_and_evaluate(cfg, workdir)
  message = str(err.value)
  assert message.startswith(f'{newest}: cannot restore the training checkpoint of step 6: ')
  assert 'truncated or corrupt' in message
  assert f'mv {newest} {newest}.bad) to resume from step 3' in message
  shutil.move(newest, newest + '.bad')  # what the message says to do
  assert loop.train_and_evaluate(cfg, workdir)['step'] == 6
  assert train_losses(workdir) == full  # steps 4-6 recomputed from step 3, identically


def _initial_state(cfg, workdir):
  run = build_run(cfg, workdir)
  return run, create_initial_state(run)


def test_checkpoint_of_another_model_or_layout_lists_the_keys(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir)
  run, state = _initial_state(cfg, str(tmp_path))
  other_cfg = tiny_config(digits_dir)
  other_cfg.model.dim_embed = (16, 48)
  other_cfg.model.num_heads = (1, 3)
  other_run, other_state = _initial_state(other_cfg, str(tmp_path))
  ckpts = Checkpointer(str(tmp_path / 'checkpoints'), keep=10, async_save=False)
  ckpts.save(1, other_state)
  # A "newer format": the same arrays under a renamed key, plus a key this version does not know.
  nested = to_nested_dict(state)
  nested['optimizer'] = nested.pop('opt_state')
  nested['ema_params'] = nested['params']
  ckpts.save(2, nested)
  with pytest.raises(CheckpointRestoreError) as err:
    ckpts.restore(1, run.abstract_state)
  message = str(err.value)
  assert 'does not hold the train state this config needs' in message
  assert 'params/head/kernel: checkpoint (48, 10), expected (32, 10)' in message
  assert 'missing keys' not in message
  with pytest.raises(CheckpointRestoreError) as err:
    ckpts.restore(2, run.abstract_state)
  message = str(err.value)
  assert re.search(r'missing keys \(\d+\): opt_state/', message)
  assert re.search(r'unexpected keys \(\d+\): ema_params/head/bias; ema_params/head/kernel; .*'
                   r'; optimizer/', message)
  assert 'to resume from step 1' in message  # older checkpoints are offered
  restored = ckpts.restore(1, other_run.abstract_state)  # the right target works
  np.testing.assert_array_equal(restored.params['head']['kernel'].get_value(),
                                other_state.params['head']['kernel'].get_value())
  ckpts.close()


def test_workdir_of_a_newer_or_unknown_format(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir)
  run, state = _initial_state(cfg, str(tmp_path))
  ckpts = Checkpointer(str(tmp_path / 'checkpoints'), keep=10)
  ckpts.save(3, state)
  ckpts.close()
  write_run_files(run, str(tmp_path))
  path = tmp_path / 'model_config.json'
  doc = json.loads(path.read_text())
  for change, message in (({'version': 3}, 'format version 3 was written by a newer cvt-flax'),
                          ({'format': 'orbax'}, "format 'orbax', expected 'cvt_flax.model'")):
    path.write_text(json.dumps(dict(doc, **change)))
    with pytest.raises(CheckpointError, match=f'{path}: {message}'):
      loop.train_and_evaluate(cfg, str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# 4. Untrusted .pth files given as init_from: refused before anything runs.

class _CreatesFile:
  """A pickle whose loading would create `marker` (if it ever ran)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_untrusted_pth_as_init_from(digits_dir, tmp_path):
  marker = tmp_path / 'PWNED'
  evil = tmp_path / 'evil.pth'
  torch.save({'stage0.patch_embed.proj.weight': _CreatesFile(marker)}, evil)
  cfg = tiny_config(digits_dir, init_from=str(evil))
  with pytest.raises(ConversionError,
                     match=rf'{evil}: refused to load.*Nothing in it was executed'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert not marker.exists()

  state = torch.load(DATA / 'official_tiny.pth', weights_only=True)
  state['stage1.blocks.0.mlp.fc1.weight'][0, 0] = float('inf')
  state['head.bias'] = state['head.bias'].to(torch.int64)
  torch.save(state, tmp_path / 'bad.pth')
  cfg = tiny_config(digits_dir, init_from=str(tmp_path / 'bad.pth'),
                    init_from_spec=str(DATA / 'official_tiny.json'))
  with pytest.raises(ConversionError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert 'stage1.blocks.0.mlp.fc1.weight: contains 1 NaN/Inf' in str(err.value)
  assert 'head.bias: dtype int64, expected a floating-point tensor' in str(err.value)


# ----------------------------------------------------------------------------------------------------
# 5. A NaN gradient under a finite loss (the NaN loss case: tests/test_train_nan.py).

@jax.custom_vjp
def _nan_gradient_if(flag, x):
  return x


def _fwd(flag, x):
  return x, flag


def _bwd(flag, g):
  return None, g * jnp.where(flag, jnp.nan, 1.0)


_nan_gradient_if.defvjp(_fwd, _bwd)


def test_nan_gradient_stops_training_and_keeps_the_last_good_checkpoint(
    digits_dir, tmp_path, monkeypatch):
  real_call = CvT.__call__

  def call(self, x, *args, **kwargs):  # the step-3 batch is all white
    return _nan_gradient_if(jnp.min(x) >= WHITE, real_call(self, x, *args, **kwargs))

  monkeypatch.setattr(CvT, '__call__', call)
  white_images_at_step(monkeypatch, 3)
  cfg = tiny_config(digits_dir, checkpoint_every_steps=2)
  with pytest.raises(loop.TrainingDivergedError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path))
  message = str(err.value)
  # The loss is checked first, so naming grad_norm shows that the loss of step 3 was finite.
  assert 'train/grad_norm is nan at step 3 of 6' in message
  assert 'newest checkpoint (step 2) is the last good one' in message
  assert _steps(tmp_path) == [2]
  assert sorted(train_losses(tmp_path)) == [1, 2]


# ----------------------------------------------------------------------------------------------------
# 8. An unwritable workdir or a full disk: before training, or at a save (the older one survives).

def test_unwritable_or_full_workdir_fails_before_training(digits_dir, tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('not a directory')
  cfg = tiny_config(digits_dir)
  with pytest.raises(WorkdirError, match=f'workdir {tmp_path}/file/run is not writable: Not a dir'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'file' / 'run'))

  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with monkeypatch.context() as patch:
    patch.setattr(os, 'fsync', no_space)  # the probe write's fsync is where a full disk shows
    with pytest.raises(WorkdirError, match='is not writable: No space left on device'):
      loop.train_and_evaluate(cfg, str(tmp_path / 'full'))
  assert os.listdir(tmp_path / 'full') == []  # the probe file is not left behind

  free = 100 * 1024  # less than one checkpoint of the tiny model (~0.3 MiB)
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage',
                      lambda path: types.SimpleNamespace(total=10 * free, used=9 * free, free=free))
  with pytest.raises(WorkdirError, match=r'checkpoints: only 0.1 MiB free on its disk, but a '
                                         r'checkpoint of this run takes about 0\.\d MiB'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'small'))
  assert not os.path.exists(tmp_path / 'small' / 'metrics.jsonl')  # stopped before training


@pytest.mark.parametrize('async_save', [True, False])
def test_failed_save_keeps_the_previous_checkpoint(digits_dir, tmp_path, monkeypatch, async_save):
  rename = atomicity.async_path.rename

  async def no_space_for_step_4(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == '4':
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return await rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(atomicity.async_path, 'rename', no_space_for_step_4)
  # keep_checkpoints=1: a save that deleted the older checkpoint before succeeding would lose all.
  cfg = tiny_config(digits_dir, checkpoint_every_steps=2, keep_checkpoints=1,
                    checkpoint_async=async_save)
  with pytest.raises(CheckpointSaveError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path))
  message = str(err.value)
  assert message.startswith(f'Saving the training checkpoint of step 4 in {tmp_path}/checkpoints '
                            'failed: OSError: [Errno 28] No space left on device')
  assert 'The newest complete checkpoint is step 2; it was not modified.' in message
  monkeypatch.undo()
  assert _steps(tmp_path) == [2]
  assert '4.orbax-checkpoint-tmp' in os.listdir(tmp_path / 'checkpoints')  # never a checkpoint
  if async_save:  # (the same code path for both)
    assert loop.train_and_evaluate(cfg, str(tmp_path))['step'] == 6  # resumes from step 2
    assert os.listdir(tmp_path / 'checkpoints') == ['6']  # the temporary directory was removed
