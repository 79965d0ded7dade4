r"""Compiles a training config for a TPU slice on this machine (no TPU needed) and reports whether
it fits and how fast it should run.

    python -m cvt_flax.aot --config configs/imagenet.py:cvt-13,224 --topology v5e-8
    python -m cvt_flax.aot --config configs/imagenet.py:cvt-w24,384 --topology v5e-8 \
        --config.fsdp=False --json
    python -m cvt_flax.aot --config configs/finetune.py:cifar100 --topology v4-8 \
        --config.model.variant=cvt-21
    python -m cvt_flax.aot --topology help

The run is the one `train.py` would build on that slice (`cvt_flax.aot.compile`). A config that
takes its architecture from `init_from` (configs/finetune.py) names it here with
`--config.model.variant`. Exit status: 0 if the train and eval steps fit in the chips' HBM, 2 if
they do not (the message says what to change), 1 for bad input.
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from cvt_flax import errors, files

try:
  errors.require_installed('train', 'absl', 'ml_collections', 'tensorflow')
except errors.MissingExtraError as _missing:
  sys.exit(f'ERROR: {_missing}')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from cvt_flax.aot import compile as aot_compile, report, tpus
from cvt_flax.runtime import platforms
from cvt_flax.training import config as config_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None,
                                "TPU slice as Cloud TPU names it: v4-8, v5e-16, v5p-128, v6e-256 "
                                "('help' lists them).")
_JSON = flags.DEFINE_bool('json', False, 'Also print one JSON object as the last line of stdout.')
_EVAL = flags.DEFINE_bool('eval', True, 'Also compile the eval step.')
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    'num_train_examples', None, 'Train-split size for the schedule when the dataset is not '
    'prepared here and cvt_flax.aot does not know it.')
_TOP_COSTS = flags.DEFINE_integer('top_costs', 0, "Also print the train step's N costliest ops.")
_HLO_OUT = flags.DEFINE_string('hlo_out', None, "Write the train step's compiled HLO text here.")
flags.mark_flags_as_required(['topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  platforms.skip_tpu_without_chips()  # the compile-only TPU devices load libtpu themselves
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _TOPOLOGY.value == 'help':
    print(tpus.describe_slices())
    return
  if _CONFIG.value is None:
    raise app.UsageError('--config is required.')
  try:
    config = _CONFIG.value
    config_lib.validate_config(config)
    tpu_slice = tpus.parse_slice(_TOPOLOGY.value)
    compiled = aot_compile.compile_for_slice(config, tpu_slice, with_eval=_EVAL.value,
                                             num_train_examples=_TRAIN_EXAMPLES.value)
  except errors.EXPECTED_ERRORS as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)
  print(report.to_text(compiled), flush=True)
  if _TOP_COSTS.value and compiled.train.hlo_text:
    print(report.costs_text(compiled, _TOP_COSTS.value))
  if _HLO_OUT.value:
    files.write_text(_HLO_OUT.value, compiled.train.hlo_text)
  if _JSON.value:
    print(json.dumps(report.to_json(compiled), sort_keys=True))
  if not report.fits(compiled):
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
