"""Multi-host failures: a process that never starts, or that dies, ends the others with a clear
error within a bounded time; nothing hangs. Two local `train.py` processes, jax.distributed on CPU
with gloo collectives, short timeouts set with train.py's flags."""
import time

import pytest

from helpers import TrainProcess, free_port, write_config_file

# `slow` (CI's make test-slow): real train.py processes; on 2 cores each launch costs ~1 min of
# start-up and XLA compilation whatever the number of steps.
pytestmark = pytest.mark.slow

INIT_TIMEOUT = 10  # --distributed_init_timeout (default 300)
HEARTBEAT_TIMEOUT = 5  # --distributed_heartbeat_timeout (default 100)
# Allowance on top of a timeout for interpreter start-up and JAX's reaction, on a loaded machine.
SLACK = 60


def _distributed_flags(port, process_id, init_timeout=INIT_TIMEOUT):
  return ['--jax_distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          f'--process_id={process_id}', '--cpu_collectives=gloo',
          f'--distributed_init_timeout={init_timeout}',
          f'--distributed_heartbeat_timeout={HEARTBEAT_TIMEOUT}']


@pytest.fixture(scope='module')
def long_config(tmp_path_factory, digits_dir):
  """A run far longer than the tests wait: it only ends by failing."""
  return write_config_file(tmp_path_factory.mktemp('config'), 'long_digits', digits_dir,
                           num_train_steps=1000, checkpoint_every_steps=2)


@pytest.mark.parametrize('process_id', [0, 1])
def test_a_process_that_never_starts_ends_the_other(tmp_path, long_config, compile_cache,
                                                    process_id):
  """Only one of the two processes is launched (0 hosts the coordinator; 1 finds none)."""
  port = free_port()
  started = time.monotonic()
  alone = TrainProcess(tmp_path, 'alone', long_config, tmp_path / 'run', compile_cache,
                       *_distributed_flags(port, process_id))
  try:
    returncode = alone.proc.wait(timeout=INIT_TIMEOUT + SLACK)
  finally:
    if alone.proc.poll() is None:
      alone.proc.kill()
  assert returncode != 0 and time.monotonic() - started < INIT_TIMEOUT + SLACK
  stderr = alone.stderr()
  assert (f'jax.distributed: process {process_id} of 2 connecting to 127.0.0.1:{port}; waiting '
          f'up to {INIT_TIMEOUT}s for all processes') in stderr
  assert 'Terminating process because the JAX distributed service detected fatal errors' in stderr
  assert 'DEADLINE_EXCEEDED' in stderr
  assert not (tmp_path / 'run').exists()  # it stopped before touching the workdir


@pytest.mark.parametrize('victim', [1, 0])
def test_a_process_that_dies_ends_the_other(tmp_path, long_config, compile_cache, victim):
  """Both train; at step 3 one is SIGKILLed (0 is also the coordinator); the other must exit."""
  port = free_port()
  markers = [tmp_path / f'process{i}_at_step_3' for i in range(2)]
  procs = [TrainProcess(tmp_path, f'process{i}', long_config, tmp_path / 'run', compile_cache,
                        *_distributed_flags(port, i, init_timeout=300), FAILTEST_BATCH_DELAY='0.2',
                        FAILTEST_MARK_STEP='3', FAILTEST_MARKER=str(markers[i]))
           for i in range(2)]
  try:
    for proc, marker in zip(procs, markers):
      proc.wait_for(marker.exists, 'step 3')
    procs[victim].proc.kill()
    killed = time.monotonic()
    survivor = procs[1 - victim]
    survivor.proc.wait(timeout=HEARTBEAT_TIMEOUT + SLACK)
    elapsed = time.monotonic() - killed
  finally:
    for proc in procs:
      if proc.proc.poll() is None:
        proc.proc.kill()
  assert survivor.proc.returncode != 0 and elapsed < HEARTBEAT_TIMEOUT + SLACK
  stderr = survivor.stderr()
  assert 'This most likely indicates that another task died' in stderr
  if victim == 1:  # the coordinator's process sees a failed collective first, and says what to do
    assert 'ERROR: process 0 of 2: ' in stderr
    assert 'another process has probably died or been preempted' in stderr
    assert 'Restart all processes with the same command; they resume from the newest checkpoint' \
        in stderr
