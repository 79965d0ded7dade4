r"""Trains CvT. All settings come from a config file; this script only parses flags.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/imagenet.py:cvt-13,224 --workdir /mnt/bucket/cvt13 \
        --config.input.data_dir=gs://bucket/tfds --jax_distributed

`--config.<field>=<value>` overrides a config field (the config is locked: a misspelt field fails).
Rerunning the same command resumes from the newest checkpoint in the workdir.

Exit status: 0 when training finished, and also after SIGTERM (preemption): the current step is
checkpointed first and a rerun resumes there. 1 with a one-line `ERROR:` for bad input or a failed
run (unreadable or unwritable checkpoints, bad data, NaN/Inf loss, ...). 134 (SIGABRT) when the JAX
distributed runtime ends a multi-process run because a process did not start within
--distributed_init_timeout or stopped heartbeating for --distributed_heartbeat_timeout.
"""
import os
import sys

# TensorFlow only feeds the input pipeline; keep its C++ INFO chatter off the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

try:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
except ModuleNotFoundError as _missing:
  from cvt_flax import errors  # pylint: disable=g-import-not-at-top
  sys.exit(f'ERROR: {errors.missing_extra(_missing, "train")}')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                 'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (auto-detected on TPU pods, SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_CPU_COLLECTIVES = flags.DEFINE_string('cpu_collectives', None,
                                       "Cross-process collectives for CPU devices ('gloo').")
_INIT_TIMEOUT = flags.DEFINE_integer(
    'distributed_init_timeout', 300,
    'Seconds to wait for all processes to join; then the processes that did start exit.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'distributed_heartbeat_timeout', 100,
    'Seconds without a heartbeat after which a process counts as dead and all others exit.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (Orbax reports every save) would drown the progress lines; -v 0 shows them.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that --helpfull stays fast and JAX starts after flag parsing.
  from cvt_flax import errors  # pylint: disable=g-import-not-at-top
  from cvt_flax.runtime import platforms, sharding  # pylint: disable=g-import-not-at-top
  from cvt_flax.training import loop  # pylint: disable=g-import-not-at-top
  platforms.skip_tpu_without_chips()  # before JAX starts a backend
  if _DISTRIBUTED.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _CPU_COLLECTIVES.value, init_timeout=_INIT_TIMEOUT.value,
                                    heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  try:
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.EXPECTED_ERRORS as e:  # bad input or a failed run: the message says it all
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)
  if result.get('preempted'):
    return
  print(f'Final test top-1: {result["eval/top1"]:.2%} (top-5 {result["eval/top5"]:.2%}, '
        f'step {result["step"]}, workdir {_WORKDIR.value})')


if __name__ == '__main__':
  app.run(main)
