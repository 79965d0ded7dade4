"""`make train` end to end: configs/digits.py from scratch reaches >= 97% test top-1 (slow, ~5 min)."""
import os
import re
import subprocess
import sys

import pytest

from cvt_flax.training.metrics import read_metrics
from train_testlib import ROOT, digits_dir  # pylint: disable=unused-import


@pytest.mark.slow
def test_digits_config_reaches_97_percent(digits_dir, tmp_path):
  workdir = str(tmp_path / 'digits')
  proc = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/digits.py', '--workdir', workdir,
       f'--config.input.data_dir={digits_dir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-5000:]
  match = re.search(r'Final test top-1: ([\d.]+)%', proc.stdout)
  assert match, proc.stdout[-3000:]
  top1 = float(match.group(1)) / 100
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert records[-1]['eval/top1'] == pytest.approx(top1, abs=1e-4)
  assert records[-1]['eval/num_examples'] == 360
  assert top1 >= 0.97
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert losses[-1] < 0.6 * losses[0]
