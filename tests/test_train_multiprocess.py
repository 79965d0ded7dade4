"""Two local processes (jax.distributed on CPU, gloo collectives) train, checkpoint and resume."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cvt_flax.training.checkpointing import complete_steps
from cvt_flax.training.metrics import read_metrics
from helpers import ROOT, free_port, subprocess_env

_WORKER = textwrap.dedent('''
    import json, sys
    port, pid, data_dir, workdir, steps = sys.argv[1:]
    from cvt_flax.runtime import sharding
    sharding.initialize_distributed(f'127.0.0.1:{port}', 2, int(pid), cpu_collectives='gloo')
    import jax
    from cvt_flax.training import loop
    from helpers import tiny_config
    cfg = tiny_config(data_dir, num_train_steps=int(steps), checkpoint_every_steps=2)
    result = loop.train_and_evaluate(cfg, workdir)
    print('RESULT' + json.dumps(dict(result, process=jax.process_index(),
                                     processes=jax.process_count(), devices=jax.device_count())))
''')


def _train_two_processes(data_dir, workdir, steps, cache_env):
  port = free_port()
  env = subprocess_env(cache_env)
  procs = [subprocess.Popen([sys.executable, '-c', _WORKER, str(port), str(i), data_dir, workdir,
                             str(steps)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  try:
    for proc in procs:  # each in turn: a peer may still be leaving jax.distributed when one ends
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, f'process failed:\n{out[-2000:]}\n{err[-5000:]}'
      results.append(json.loads(out.split('RESULT', 1)[1]))
  finally:
    for p in procs:  # after a failure or a timeout, a hung peer must not outlive the test
      if p.poll() is None:
        p.kill()
  return results


@pytest.mark.slow  # two processes start and compile, twice: ~2.5 min on 2 cores (CI runs it)
def test_two_processes_train_checkpoint_and_resume(digits_dir, compile_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  first = _train_two_processes(digits_dir, workdir, 4, compile_cache)
  assert sorted(r['process'] for r in first) == [0, 1]
  assert all(r['processes'] == 2 and r['devices'] == 2 for r in first)
  # Both processes computed the same global evaluation, each test image counted exactly once.
  assert first[0]['eval/top1'] == first[1]['eval/top1']
  assert all(r['eval/num_examples'] == 360 for r in first)
  assert complete_steps(os.path.join(workdir, 'checkpoints')) == [2, 4]

  # Both processes restore step 4 and continue to step 6 (a longer run of the same model).
  second = _train_two_processes(digits_dir, workdir, 6, compile_cache)
  assert all(r['step'] == 6 for r in second)
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  # Only process 0 writes: one record per step, no duplicates from process 1.
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert all(r['train/loss'] > 0 for r in records)
