"""The device benchmark runs end to end (a tiny model on CPU), and needs no TensorFlow."""
import json
import re
import subprocess
import sys

import pytest

from helpers import PARITY_ATOL, ROOT, subprocess_env

# The driver with TensorFlow made unimportable (the GPU image has none); its workers import the
# same modules. As `python SCRIPT` does, the script's folder comes first on the path.
_NO_TF = ("import os, runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
          "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0]))); "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.bench  # four benchmark processes: ~1.5 min on 2 cores
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


def _profile_ops():
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  try:
    import profile_ops  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return profile_ops


@pytest.mark.parametrize('op_name,mode,label', [
    ('jit(step)/jvp(CvT)/stages/mlp/dot_general', 'train', 'mlp'),
    ('jit(step)/transpose(jvp(CvT))/layer_norm/reduce_sum', 'train', 'layer_norm (backward)'),
    ('jit(step)/jvp(CvT)/patch_embed/reduce_sum', 'train', 'patch_embed'),
    ('jit(f)/jvp(mlp)/layer_norm/mul', 'train', 'layer_norm'),  # the innermost scope
    ('jit(step)/add', 'train', 'optimizer'),  # no jvp: the update
    ('', 'train', 'other'),  # ops in while loops carry no op_name
    ('jit(<lambda>)/attention_core/exp', 'infer', 'attention_core'),
])
def test_profile_labels_each_op_by_its_innermost_named_scope(op_name, mode, label):
  assert _profile_ops()._label(op_name, mode) == label  # pylint: disable=protected-access


def test_profile_times_are_wall_clock_with_gaps_given_to_the_last_matmul():
  # (start, end, category, is a matmul), in ns * 1e3 (ps): two thunks overlap, then nothing runs
  # while an asynchronous matmul finishes, then one more thunk.
  intervals = [(0, 4000, 'mlp', True), (2000, 6000, 'layer_norm', False),
               (10000, 12000, 'other', False)]
  ms = _profile_ops()._wall_clock_ms(intervals)  # pylint: disable=protected-access
  assert ms == pytest.approx({'mlp': 3e-6 + 4e-6, 'layer_norm': 3e-6, 'other': 2e-6})
  assert sum(ms.values()) == pytest.approx(12e-6)  # the whole span, counted once


@pytest.mark.bench  # four profiled processes of CvT-13 at 64 px: ~2.5 min on 2 cores
def test_profile_ops_tables_cover_both_frameworks():
  proc = subprocess.run(
      [sys.executable, 'benchmarks/profile_ops.py', '--batch', '2', '--image-size', '64',
       '--steps', '1'], cwd=ROOT, env=subprocess_env({}), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tables = proc.stdout.split('### ')[1:]
  assert [t.split(':')[0] for t in tables] == ['cvt-13, batch 2, infer', 'cvt-13, batch 2, train']
  for table, mode in zip(tables, ('infer', 'train')):
    rows = {line.split(' | ')[0].lstrip('| '): line for line in table.splitlines()
            if line.startswith('| ') and not line.startswith('| op |')}
    for category in _profile_ops().CATEGORIES:
      assert category in rows, (mode, category, table)
    if mode == 'train':
      assert 'mlp (backward)' in rows and 'optimizer' in rows, table


@pytest.mark.bench  # seven benchmark processes of CvT-13 at 64 px: ~4.5 min on 2 cores
def test_bench_model_times_flax_hf_and_the_exported_forms_on_the_same_weights():
  proc = subprocess.run(
      [sys.executable, 'benchmarks/bench_model.py', '--batch', '2', '--image-size', '64',
       '--steps', '1', '--frameworks', 'flax,hf,jax-export,onnx,savedmodel'], cwd=ROOT,
      env=subprocess_env({}), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split(' | ') for line in proc.stdout.splitlines()
          if line.startswith('| ') and not line.startswith(('| framework', '|---'))]
  assert [(r[0].lstrip('| '), r[1]) for r in rows] == [
      ('flax', 'infer'), ('hf', 'infer'), ('jax-export', 'infer'), ('onnx', 'infer'),
      ('savedmodel', 'infer'), ('flax', 'train'), ('hf', 'train')]  # exports: inference only
  assert all(float(r[2]) > 0 for r in rows)  # images/s
  assert all(r[-1].strip(' |').endswith('x') for r in rows if r[0] != '| flax')  # speed-ups
  for form in ('jax-export', 'onnx', 'savedmodel'):  # the same weights: the same logits
    diff = re.search(rf'logits\({form}\)\| = ([\d.e+-]+)', proc.stdout)
    assert diff and float(diff.group(1)) <= PARITY_ATOL, proc.stdout
    assert re.search(rf'- {form}: exported in [\d.]+ s, [\d.]+ MiB', proc.stdout)
