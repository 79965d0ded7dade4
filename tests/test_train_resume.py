"""Resume exactness and preemption: a run stopped and resumed equals the uninterrupted run."""
import os
import shutil
import signal

from cvt_flax import train_lib
from cvt_flax.training.checkpointing import Checkpointer
from cvt_flax.training.metrics import read_metrics
from train_testlib import digits_dir, tiny_config, train_losses  # pylint: disable=unused-import


def _sigterm_before_step(monkeypatch, step):
  """Sends this process a real SIGTERM when the batch of optimizer step `step` is taken."""
  real = train_lib.data.make_train_iterator

  def wrapped(*args, start_step=0, **kwargs):
    for i, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      if i + 1 == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train_lib.data, 'make_train_iterator', wrapped)


def test_preempted_and_crashed_runs_resume_bitwise_exact(digits_dir, tmp_path, monkeypatch):
  cfg = tiny_config(digits_dir)  # 6 steps, checkpoints every 3, dropout + drop path + mixup on
  full = train_lib.train_and_evaluate(cfg, str(tmp_path / 'full'))
  assert full['step'] == 6

  split = str(tmp_path / 'split')
  _sigterm_before_step(monkeypatch, 5)
  assert train_lib.train_and_evaluate(cfg, split) == {'step': 5, 'preempted': True}
  monkeypatch.undo()
  ckpts = Checkpointer(os.path.join(split, 'checkpoints'), keep=10)
  assert ckpts.all_steps() == [3, 5]  # the regular one and the one saved on SIGTERM
  ckpts.close()
  # Now a crash right after step 5 was logged but before its checkpoint: resume from step 3.
  shutil.rmtree(os.path.join(split, 'checkpoints', '5'))
  assert sorted(train_losses(split)) == [1, 2, 3, 4, 5]

  resumed = train_lib.train_and_evaluate(cfg, split)
  assert resumed == full  # same final eval, bit for bit
  full_losses = train_losses(str(tmp_path / 'full'))
  assert sorted(full_losses) == [1, 2, 3, 4, 5, 6]
  assert train_losses(split) == full_losses  # exact float equality, every step
  steps = [r['step'] for r in read_metrics(os.path.join(split, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5, 6]  # appended on resume; records of redone steps not duplicated


def test_finished_run_only_evaluates(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir, num_train_steps=2, checkpoint_every_steps=2)
  first = train_lib.train_and_evaluate(cfg, str(tmp_path))
  again = train_lib.train_and_evaluate(cfg, str(tmp_path))
  assert again == first
  assert sorted(train_losses(str(tmp_path))) == [1, 2]


def test_resume_with_another_model_is_refused(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir, num_train_steps=1, checkpoint_every_steps=1)
  train_lib.train_and_evaluate(cfg, str(tmp_path))
  cfg.model.dim_embed = (16, 48)
  cfg.model.num_heads = (1, 3)
  try:
    train_lib.train_and_evaluate(cfg, str(tmp_path))
  except ValueError as e:
    assert 'another model' in str(e) and 'new workdir' in str(e)
  else:
    raise AssertionError('resuming a workdir with a different model must fail')
