"""Preemption and crashes of a real `train.py` process: SIGKILL during an async save, SIGTERM.

Each run is a subprocess (`train.py` on a 12-step tiny digits config, checkpoints every 3 steps),
optionally with a fault hook installed before `train.py` starts. Resumed runs must reproduce the
per-step losses of an uninterrupted run exactly.
"""
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from train_testlib import (  # pylint: disable=unused-import  (fixtures are used by name)
    ROOT, compile_cache, digits_dir, train_losses)

STEPS = 12
TIMEOUT = 300  # seconds; a run takes ~15 s (plus ~20 s to compile if the cache is cold)

_WORKER = textwrap.dedent('''
    import os, runpy, sys, time
    hang_step = os.environ.get('FAILTEST_HANG_SAVE_OF_STEP')
    if hang_step:
      # Holds the save of that step just before Orbax renames its temporary directory into place:
      # all files are written (commit_success.txt too), but the checkpoint is not final yet.
      from orbax.checkpoint._src.path import atomicity
      rename = atomicity.async_path.rename
      async def hanging_rename(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == hang_step:
          open(os.environ['FAILTEST_MARKER'], 'w').close()
          time.sleep(3600)
        return await rename(src, dst, *args, **kwargs)
      atomicity.async_path.rename = hanging_rename
    delay = float(os.environ.get('FAILTEST_BATCH_DELAY', '0'))  # slows every step down
    mark_step = int(os.environ.get('FAILTEST_MARK_STEP', '0'))  # creates FAILTEST_MARKER then
    if delay or mark_step:
      from cvt_flax import train_lib
      make_train_iterator = train_lib.data.make_train_iterator
      def hooked(*args, start_step=0, **kwargs):
        batches = make_train_iterator(*args, start_step=start_step, **kwargs)
        for step, batch in enumerate(batches, start_step + 1):
          if step == mark_step:
            open(os.environ['FAILTEST_MARKER'], 'w').close()
          time.sleep(delay)
          yield batch
      train_lib.data.make_train_iterator = hooked
    sys.argv = ['train.py', *sys.argv[1:]]
    runpy.run_path('train.py', run_name='__main__')
''')


class TrainProcess:
  """A `train.py` subprocess whose stdout/stderr go to files (readable while it runs).

  `hooks`: FAILTEST_* environment variables for the fault hooks of `_WORKER`.
  """

  def __init__(self, tmp_path, name, config, workdir, cache_env, *flags, **hooks):
    self.out, self.err = tmp_path / f'{name}.out', tmp_path / f'{name}.err'
    env = dict(os.environ, **cache_env, **hooks, JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]))
    env.pop('XLA_FLAGS', None)
    with open(self.out, 'w') as out, open(self.err, 'w') as err:
      self.proc = subprocess.Popen(
          [sys.executable, '-c', _WORKER, '--config', str(config), '--workdir', str(workdir),
           *flags], cwd=ROOT, env=env, stdout=out, stderr=err)

  def stderr(self) -> str:
    return self.err.read_text()

  def stdout(self) -> str:
    return self.out.read_text()

  def wait_for(self, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f'train.py exited ({self.proc.returncode}) before {what}:\n'
                             f'{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}')
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f'timed out waiting for {what}')
      time.sleep(0.1)

  def finish(self, expect_returncode=0, timeout=TIMEOUT) -> str:
    try:
      self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    assert self.proc.returncode == expect_returncode, (
        f'returncode {self.proc.returncode}:\n{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}')
    return self.stdout()


@pytest.fixture(scope='module')
def config_file(tmp_path_factory, digits_dir):
  path = tmp_path_factory.mktemp('config') / 'tiny_digits.py'
  path.write_text(textwrap.dedent(f'''
      from train_testlib import tiny_config
      def get_config():
        return tiny_config({digits_dir!r}, num_train_steps={STEPS}, checkpoint_every_steps=3)
  '''))
  return path


@pytest.fixture(scope='module')
def reference(tmp_path_factory, config_file, compile_cache):
  """The uninterrupted run: its per-step losses and final line."""
  tmp = tmp_path_factory.mktemp('reference')
  out = TrainProcess(tmp, 'reference', config_file, tmp / 'run', compile_cache).finish()
  losses = train_losses(tmp / 'run')
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses, _final_line(out)


def _final_line(stdout: str) -> str:
  return re.search(r'^Final test top-1: .*step 12', stdout, re.M).group(0).split(', workdir')[0]


def _digest(path) -> str:
  """A hash of the names and bytes of every file under `path`."""
  sha = hashlib.sha256()
  for parent, _, names in sorted(os.walk(path)):
    for name in sorted(names):
      full = os.path.join(parent, name)
      sha.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        sha.update(f.read())
  return sha.hexdigest()


def test_sigkill_during_async_save_resumes_from_newest_complete_checkpoint(
    tmp_path, config_file, reference, compile_cache):
  workdir, marker = tmp_path / 'run', tmp_path / 'saving_9'
  run = TrainProcess(tmp_path, 'killed', config_file, workdir, compile_cache,
                     FAILTEST_HANG_SAVE_OF_STEP='9', FAILTEST_MARKER=str(marker))
  run.wait_for(marker.exists, 'the save of step 9')
  checkpoints = workdir / 'checkpoints'
  # The save of step 9 is in flight: its files are on disk, under Orbax's temporary name.
  assert sorted(os.listdir(checkpoints)) == ['3', '6', '9.orbax-checkpoint-tmp']
  assert (checkpoints / '9.orbax-checkpoint-tmp' / 'state').is_dir()
  kept = {name: _digest(checkpoints / name) for name in ('3', '6')}
  configs = {name: (workdir / name).read_text()
             for name in ('model_config.json', 'train_config.json')}
  run.proc.kill()  # SIGKILL: no handler, no cleanup
  run.finish(expect_returncode=-signal.SIGKILL)
  # A kill can also cut the metrics line being written; the restart must cope with that too.
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 13, "train/lo')

  out = TrainProcess(tmp_path, 'resumed', config_file, workdir, compile_cache).finish()
  assert 'resuming at step 6' in out  # the newest *complete* checkpoint, never the partial 9
  losses, final = reference
  assert train_losses(workdir) == losses  # every step, exactly
  assert _final_line(out) == final
  assert sorted(os.listdir(checkpoints), key=int) == ['3', '6', '9', '12']  # no temporary left
  assert {name: _digest(checkpoints / name) for name in ('3', '6')} == kept
  assert {name: (workdir / name).read_text() for name in configs} == configs


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(
    tmp_path, config_file, reference, compile_cache):
  workdir = tmp_path / 'run'
  run = TrainProcess(tmp_path, 'preempted', config_file, workdir, compile_cache,
                     FAILTEST_BATCH_DELAY='0.5')
  run.wait_for(lambda: f'step 4/{STEPS}' in run.stdout(), 'step 4')
  run.proc.send_signal(signal.SIGTERM)
  out = run.finish(expect_returncode=0)
  stopped = int(re.search(r'Preempted: saved a checkpoint at step (\d+)', out).group(1))
  assert 4 <= stopped < STEPS  # between steps, not at the end (steps take >= 0.5 s)
  assert str(stopped) in os.listdir(workdir / 'checkpoints')
  assert max(train_losses(workdir)) == stopped

  out = TrainProcess(tmp_path, 'resumed', config_file, workdir, compile_cache).finish()
  assert f'resuming at step {stopped}' in out
  losses, final = reference
  assert train_losses(workdir) == losses
  assert _final_line(out) == final
