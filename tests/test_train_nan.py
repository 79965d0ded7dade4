"""A NaN/Inf loss stops training with a clear message; the last good checkpoint stays the newest."""
import os

import jax.numpy as jnp
import pytest

from cvt_flax.models.cvt import CvT
from cvt_flax.training import loop
from cvt_flax.training.checkpointing import complete_steps
from helpers import WHITE, tiny_config, train_losses, white_images_at_step


def _nan_images_at_step(monkeypatch, step):
  """Data the model turns into a NaN loss at `step` (uint8 pixels cannot be NaN themselves): that
  batch is all white, and the model's logits are NaN for an all-white batch."""
  white_images_at_step(monkeypatch, step)
  real_call = CvT.__call__

  def call(self, x, *args, **kwargs):
    return jnp.where(jnp.min(x) >= WHITE, jnp.nan, real_call(self, x, *args, **kwargs))

  monkeypatch.setattr(CvT, '__call__', call)


def test_nan_stops_before_the_next_checkpoint(digits_dir, tmp_path, monkeypatch):
  # Not a logged step, so the NaN (step 3) is caught by the check that precedes the step-4 save.
  cfg = tiny_config(digits_dir, log_every_steps=100, checkpoint_every_steps=2)
  _nan_images_at_step(monkeypatch, 3)
  with pytest.raises(loop.TrainingDivergedError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path))
  message = str(err.value)
  assert 'train/loss is nan at step 3 of 6' in message
  assert 'newest checkpoint (step 2)' in message
  assert 'base_lr' in message and 'float32' in message and 'input data' in message
  assert complete_steps(os.path.join(tmp_path, 'checkpoints')) == [2]
  assert train_losses(str(tmp_path)) == {}  # nothing was logged before the failure


def test_nan_at_a_logged_step(digits_dir, tmp_path, monkeypatch):
  cfg = tiny_config(digits_dir, checkpoint_every_steps=2)  # logs every step
  _nan_images_at_step(monkeypatch, 3)
  with pytest.raises(loop.TrainingDivergedError, match='at step 3 of 6'):
    loop.train_and_evaluate(cfg, str(tmp_path))
  assert sorted(train_losses(str(tmp_path))) == [1, 2]
  assert complete_steps(os.path.join(tmp_path, 'checkpoints')) == [2]
