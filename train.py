r"""Trains CvT. All settings come from a config file; this script only parses flags.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/imagenet.py:cvt-13,224 --workdir /mnt/bucket/cvt13 \
        --config.input.data_dir=gs://bucket/tfds --jax_distributed

`--config.<field>=<value>` overrides a config field (the config is locked: a misspelt field fails).
Rerunning the same command resumes from the newest checkpoint in the workdir.

Exit status: 0 when training finished, and also after SIGTERM (preemption): the current step is
checkpointed first and a rerun resumes there. 2 with one line, `error: ...`, for bad input or a
failed run (a misspelt field, a missing config file or dataset, unreadable or unwritable
checkpoints, bad data, NaN/Inf loss, ...; `cvt_flax.errors`); a run that fails before training
starts leaves no workdir behind. 1 with a traceback for a bug. 134 (SIGABRT) when the JAX
distributed runtime ends a multi-process run because a process did not start within
--distributed_init_timeout or stopped heartbeating for --distributed_heartbeat_timeout.
"""

from cvt_flax import errors
from cvt_flax.runtime import platforms

platforms.quiet_tensorflow()  # before a config file imports TensorFlow

try:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from cvt_flax.training import config_flag  # pylint: disable=g-import-not-at-top
except ModuleNotFoundError as _missing:
  errors.fail(errors.missing_extra(_missing, 'train'))

_CONFIG = config_flag.define_config_flag()
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
    errors.fail(f'unexpected arguments {argv[1:]}: settings are flags (--helpshort).')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (Orbax reports every save) would drown the progress lines; -v 0 shows them.
    logging.set_verbosity(logging.WARNING)
  # Imported here so that --helpfull stays fast and JAX starts after flag parsing.
  from cvt_flax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from cvt_flax.training import loop  # pylint: disable=g-import-not-at-top
  platforms.cpu_only_without_accelerator()  # before JAX starts a backend
  if _DISTRIBUTED.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _CPU_COLLECTIVES.value, init_timeout=_INIT_TIMEOUT.value,
                                    heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  with errors.reported():  # bad input or a failed run: the message says it all
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get('preempted'):
    return
  print(f'Final test top-1: {result["eval/top1"]:.2%} (top-5 {result["eval/top5"]:.2%}, '
        f'step {result["step"]}, workdir {_WORKDIR.value})')


if __name__ == '__main__':
  app.run(main, flags_parser=config_flag.parse_flags)
