r"""Compiles a training config for a TPU slice or an NVIDIA GPU machine on this machine (no TPU or
GPU needed) and reports whether it fits and how fast it should run.

    python -m cvt_flax.aot --config configs/imagenet.py:cvt-13,224 --topology v5e-8
    python -m cvt_flax.aot --config configs/imagenet.py:cvt-13,224 --topology h100-8
    python -m cvt_flax.aot --config configs/imagenet.py:cvt-13,224 --topology v6e-8 --measure_host
    python -m cvt_flax.aot --config configs/imagenet.py:cvt-w24,384 --topology v5e-8 \
        --config.fsdp=False --json
    python -m cvt_flax.aot --config configs/finetune.py:cifar100 --topology v4-8 \
        --config.model.variant=cvt-21
    python -m cvt_flax.aot --topology help

The run is the one `train.py` would build on that slice (`cvt_flax.aot.compile`). GPUs need JAX's
CUDA plugin: `pip install 'cvt-flax[gpu-aot]'` (`make test` installs it). A config that
takes its architecture from `init_from` (configs/finetune.py) names it here with
`--config.model.variant`. `--measure_host` times the config's train input pipeline on
synthetic JPEGs on this machine's CPUs (about a minute) and bounds the estimate by what the
slice's hosts deliver at that rate per vCPU (`cvt_flax.aot.report`). Exit status: 0 if the train
and eval steps fit in the chips' HBM; 2 if they do not (the message says what to change) or for
bad input (one line, `error: ...`). While it compiles, stderr says what and for how long.
"""
import json
import sys
import tempfile

from cvt_flax import errors, files
from cvt_flax.runtime import platforms

platforms.quiet_tensorflow()  # before a config file imports TensorFlow

with errors.reported():
  errors.require_installed('train', 'absl', 'ml_collections', 'tensorflow')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging

from cvt_flax.aot import compile as aot_compile, gpus, report, tpus
from cvt_flax.data import synthetic
from cvt_flax.models import compute as compute_lib
from cvt_flax.training import config as config_lib, config_flag, run as run_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flag.define_config_flag()
_TOPOLOGY = flags.DEFINE_string('topology', None,
                                "TPU slice as Cloud TPU names it (v4-8, v5e-16, v5p-128, v6e-256) "
                                "or NVIDIA GPUs (h100-8, a100-80-8, t4, l4; 'help' lists them).")
_JSON = flags.DEFINE_bool('json', False, 'Also print one JSON object as the last line of stdout.')
_EVAL = flags.DEFINE_bool('eval', True, 'Also compile the eval step.')
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    'num_train_examples', None, 'Train-split size for the schedule when the dataset is not '
    'prepared here and cvt_flax.aot does not know it.')
_TOP_COSTS = flags.DEFINE_integer('top_costs', 0, "Also print the train step's N costliest ops.")
_HLO_OUT = flags.DEFINE_string('hlo_out', None, "Write the train step's compiled HLO text here.")
_HOST_RATE = flags.DEFINE_float(
    'host_images_per_sec_per_cpu', None, "The train input pipeline's images/s per host vCPU, to "
    'bound the estimate by the hosts (default: not bounded, unless --measure_host).')
_MEASURE_HOST = flags.DEFINE_bool(
    'measure_host', False, "Measure --host_images_per_sec_per_cpu: the config's train pipeline "
    "on synthetic JPEGs on this machine's CPUs.")
flags.mark_flags_as_required(['topology'])


def _progress(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _host_rate(config) -> float | None:
  """--host_images_per_sec_per_cpu, or measured here with --measure_host."""
  if not _MEASURE_HOST.value:
    return _HOST_RATE.value
  if _HOST_RATE.value is not None:
    raise errors.ConfigError('--measure_host and --host_images_per_sec_per_cpu: give one.')
  with tempfile.TemporaryDirectory(prefix='cvt_flax_host_') as data_dir:
    _progress('measuring the train input pipeline on synthetic JPEGs (about a minute)')
    synthetic.build(data_dir)
    rate = synthetic.train_images_per_sec(config.input, data_dir) / synthetic.usable_cpus()
  _progress(f'train input pipeline: {rate:.0f} images/s per CPU here')
  return rate


def main(argv):
  if len(argv) > 1:
    errors.fail(f'unexpected arguments {argv[1:]}: settings are flags (--helpshort).')
  # The compile-only TPU and GPU devices load libtpu and the CUDA plugin themselves.
  platforms.cpu_only_without_accelerator()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _TOPOLOGY.value == 'help':
    print(tpus.describe_slices())
    print(gpus.describe_machines())
    return
  with errors.reported():
    if _CONFIG.value is None:
      raise errors.ConfigError('--config is required (configs/FILE.py[:ARG]).')
    config = _CONFIG.value
    config_lib.validate_config(config)
    name = _TOPOLOGY.value
    tpu_slice = gpus.parse_machine(name) if gpus.is_gpu_name(name) else tpus.parse_slice(name)
    host_rate = _host_rate(config)
    compiled = aot_compile.compile_for_slice(config, tpu_slice, with_eval=_EVAL.value,
                                             num_train_examples=_TRAIN_EXAMPLES.value,
                                             progress=_progress)
  print(report.to_text(compiled, host_rate), flush=True)
  choices = run_lib.compute_choices(compiled.run)
  print(f"compute ({choices['settings']['dtype']}, per stage for the train step's "
        f"{choices['batch_per_step']} images):")
  for line in compute_lib.describe_choices(choices['stages']):
    print(f'  {line}')
  if _TOP_COSTS.value and compiled.train.hlo_text:
    print(report.costs_text(compiled, _TOP_COSTS.value))
  if _HLO_OUT.value:
    files.write_text(_HLO_OUT.value, compiled.train.hlo_text)
  if _JSON.value:
    print(json.dumps({**report.to_json(compiled, host_rate), 'compute': choices}, sort_keys=True))
  if not report.fits(compiled):
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=config_flag.parse_flags)
