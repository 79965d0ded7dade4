"""Preemption and crashes of a real `train.py` process: SIGKILL during an async save, SIGTERM, the
storage of a `gs://` workdir lost during a save.

Each run is a subprocess (`train.py` on a 12-step tiny digits config, checkpoints every 3 steps),
optionally with a fault hook installed before `train.py` starts. Resumed runs must reproduce the
per-step losses of an uninterrupted run exactly.
"""
import hashlib
import os
import re
import signal

import pytest

import storage_emulator
from helpers import TrainProcess, train_losses, write_config_file

# `slow` (CI's make test-slow): real train.py processes; on 2 cores each launch costs ~1 min of
# start-up and XLA compilation whatever the number of steps.
pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope='module')
def config_file(tmp_path_factory, digits_dir):
  return write_config_file(tmp_path_factory.mktemp('config'), 'tiny_digits', digits_dir,
                           num_train_steps=STEPS, checkpoint_every_steps=3)


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


def test_storage_lost_during_an_async_save_to_a_bucket_fails_once_then_resumes(
    tmp_path, config_file, reference, compile_cache, monkeypatch):
  """A `gs://` workdir whose storage goes away while the save of step 9 is being committed."""
  emulator = storage_emulator.StorageEmulator(tmp_path / 'gcs').start()
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', emulator.url)
  workdir = emulator.url_of('run')
  marker, release = tmp_path / 'committing_9', tmp_path / 'release'
  env = {**compile_cache, **emulator.env}
  run = TrainProcess(tmp_path, 'lost', config_file, workdir, env,
                     FAILTEST_HOLD_COMMIT_OF_STEP='9', FAILTEST_MARKER=str(marker),
                     FAILTEST_RELEASE=str(release))
  try:
    run.wait_for(marker.exists, 'the commit of step 9')
    emulator.kill()
    release.touch()
    run.finish(expect_returncode=2)
    errors = [line for line in run.stderr().splitlines() if line.startswith('error')]
    assert len(errors) == 1, run.stderr()[-3000:]
    assert errors[0].startswith(f'error: Saving the training checkpoint of step 9 in {workdir}/'
                                'checkpoints failed:')
    assert 'The newest complete checkpoint is step 6' in errors[0]

    emulator.start()  # the same bucket, as the lost save left it
    out = TrainProcess(tmp_path, 'resumed', config_file, workdir, env).finish()
    assert 'resuming at step 6' in out
    losses, final = reference
    assert train_losses(workdir) == losses  # every step, exactly
    assert _final_line(out) == final
  finally:
    emulator.kill()
