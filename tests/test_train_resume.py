"""Resume exactness and preemption: a run stopped and resumed equals the uninterrupted run."""
import json
import math
import os
import shutil

import pytest

from cvt_flax.training import loop
from cvt_flax.training.checkpointing import CheckpointRestoreError, complete_steps
from cvt_flax.training.metrics import read_metrics
from helpers import sigterm_before_step, tiny_config, train_losses

def test_preempted_and_crashed_runs_resume_bitwise_exact(digits_dir, tmp_path, monkeypatch):
  cfg = tiny_config(digits_dir)  # 6 steps, checkpoints every 3, dropout + drop path + mixup on
  full = loop.train_and_evaluate(cfg, str(tmp_path / 'full'))
  assert full['step'] == 6

  split = str(tmp_path / 'split')
  sigterm_before_step(monkeypatch, 5)
  assert loop.train_and_evaluate(cfg, split) == {'step': 5, 'preempted': True}
  monkeypatch.undo()
  # the regular one and the one saved on SIGTERM
  assert complete_steps(os.path.join(split, 'checkpoints')) == [3, 5]
  # Now a crash right after step 5 was logged but before its checkpoint: resume from step 3.
  shutil.rmtree(os.path.join(split, 'checkpoints', '5'))
  assert sorted(train_losses(split)) == [1, 2, 3, 4, 5]

  resumed = loop.train_and_evaluate(cfg, split)
  assert resumed == full  # same final eval, bit for bit
  full_losses = train_losses(str(tmp_path / 'full'))
  assert sorted(full_losses) == [1, 2, 3, 4, 5, 6]
  assert train_losses(split) == full_losses  # exact float equality, every step
  steps = [r['step'] for r in read_metrics(os.path.join(split, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5, 6]  # appended on resume; records of redone steps not duplicated


def test_metrics_records_and_finished_run(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir, peak_flops_per_device=1e9, log_every_steps=2)
  first = loop.train_and_evaluate(cfg, str(tmp_path))
  records = read_metrics(os.path.join(tmp_path, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [2, 4, 6]
  for r in records:
    assert {'train/loss', 'train/lr', 'train/images_per_sec', 'train/mfu', 'train/grad_norm',
            'train/epoch'} <= set(r)
    assert r['train/images_per_sec'] > 0 and 0 < r['train/mfu'] < 10
  # Step 2 uses schedule(1): half-way through the 2-step warmup from 1e-6 to 1e-3.
  assert records[0]['train/lr'] == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-5)
  assert set(records[-1]) >= {'eval/top1', 'eval/top5', 'eval/loss'}
  assert records[-1]['eval/num_examples'] == 360
  assert os.listdir(os.path.join(tmp_path, 'tensorboard'))
  # Rerunning a finished run restores it and evaluates, without training or logging again.
  again = loop.train_and_evaluate(cfg, str(tmp_path))
  assert again == first
  assert read_metrics(os.path.join(tmp_path, 'metrics.jsonl')) == records


def test_resume_with_another_model_is_refused_naming_the_fields(digits_dir, tmp_path):
  cfg = tiny_config(digits_dir)
  loop.train_and_evaluate(cfg, str(tmp_path))
  cfg.model.dim_embed = (16, 48)
  cfg.model.num_heads = (1, 3)
  with pytest.raises(CheckpointRestoreError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path))
  message = str(err.value)
  assert ('holds checkpoints of another model: dim_embed: (16, 32) vs (16, 48); num_heads: (1, 2) '
          'vs (1, 3) (checkpoint vs config)') in message and 'new workdir' in message
  assert len(message) < 500  # the differing fields, not two config dumps


def test_float32_run_resumes_in_bfloat16_and_with_another_attention(digits_dir, tmp_path):
  """Compute settings are not part of the model: a run may change them when it resumes."""
  workdir = str(tmp_path / 'run')
  cfg = tiny_config(digits_dir, num_train_steps=3)
  loop.train_and_evaluate(cfg, workdir)
  saved = json.loads(open(os.path.join(workdir, 'model_config.json')).read())
  assert 'dtype' not in saved['config']
  cfg = tiny_config(digits_dir, num_train_steps=6, dtype='bfloat16', attention_impl='softmax',
                    dwconv_impl='xla')
  resumed = loop.train_and_evaluate(cfg, workdir)
  assert resumed['step'] == 6 and sorted(train_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert all(math.isfinite(loss) for loss in train_losses(workdir).values())
  assert json.loads(open(os.path.join(workdir, 'model_config.json')).read()) == saved
