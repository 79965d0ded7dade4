"""The device benchmark runs end to end (a tiny model on CPU), and needs no TensorFlow."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, subprocess_env

# The driver with TensorFlow made unimportable (the GPU image has none); its workers import the
# same modules.
_NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow  # four benchmark processes: ~1.2 min on 2 cores (CI runs it)
def test_bench_device_on_cpu_with_a_tiny_model(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', _NO_TF, 'benchmarks/bench_device.py', '--tiny', '--steps', '1',
       '--frameworks', 'flax,hf-eager', '--out', str(tmp_path), '--peak-tflops', '1'],
      cwd=ROOT, env=subprocess_env({'PYTHONPATH': str(ROOT)}), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'bench_device.json').read_text())['rows']
  assert {(r['framework'], r['mode']) for r in rows} == {
      ('flax', 'train'), ('flax', 'infer'), ('hf-eager', 'train'), ('hf-eager', 'infer')}
  for row in rows:
    assert 'error' not in row and row['seconds'] > 0, row
  assert all(r['flops'] > 0 for r in rows if r['framework'] == 'flax')
  table = (tmp_path / 'bench_device.md').read_text()
  assert table.count('| tiny | 64 | 4 |') == 4 and 'x |' in table  # speed-ups of the HF rows
