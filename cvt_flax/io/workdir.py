"""A training workdir: its layout, the one description of it, and the workdir read as a model.

    WORKDIR/model_config.json         the model document (`cvt_flax.io.model_dir`): architecture,
                                      its eval transform, the class names
    WORKDIR/train_config.json         the training config of the run, as the trainer resolved it
    WORKDIR/compute.json              the compute settings 'auto' resolved to, and per stage the
                                      path each op takes (kernel, cuDNN or XLA) and why
    WORKDIR/checkpoints/<step>/state  Orbax train state: `params/...`, `batch_stats/...`, `rngs`,
                                      `opt_state`, `step`
    WORKDIR/metrics.jsonl             one JSON object per logged step
    WORKDIR/tensorboard/              TensorBoard events of the same metrics
    WORKDIR/profile/                  `jax.profiler` traces (`--config.profile_steps`)

`cvt_flax.training` writes all of it, by these names. Reading a model from a workdir restores only
the weights (params and BatchNorm statistics) of a checkpoint.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from cvt_flax import files, logs
from cvt_flax.io.model_dir import CheckpointError, ModelDoc, read_model_doc, write_model_doc
from cvt_flax.models import CvT, abstract_model, finish_abstract_model
from cvt_flax.models.weights import from_nested_dict, to_nested_dict

MODEL_CONFIG_FILE = 'model_config.json'
TRAIN_CONFIG_FILE = 'train_config.json'
COMPUTE_FILE = 'compute.json'
CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'  # the Orbax item name of the train state in each checkpoint
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
PROFILE_DIR = 'profile'


def read_only_manager(directory: str, **kwargs) -> ocp.CheckpointManager:
  """An Orbax manager that only reads `directory` (lists and restores; creates and deletes nothing)."""
  # Orbax notes at warning level that a read-only manager neither creates nor saves: the point.
  logs.drop_messages('absl', r'^CheckpointManagerOptions\.read_only=True, setting ',
                     r'^Given directory is read only=')
  return ocp.CheckpointManager(files.absolute(directory),
                               options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)


def is_training_workdir(path: str) -> bool:
  return (files.isfile(os.path.join(path, MODEL_CONFIG_FILE))
          and files.isdir(os.path.join(path, CHECKPOINTS_DIR)))


def step_directory(path: str) -> tuple[str, int] | None:
  """(workdir, step) if `path` is one checkpoint of a training workdir, WORKDIR/checkpoints/<step>."""
  parent, name = os.path.split(os.fspath(path).rstrip('/'))
  if not name.isdigit() or os.path.basename(parent) != CHECKPOINTS_DIR:
    return None
  workdir = os.path.dirname(parent)
  return (workdir, int(name)) if is_training_workdir(workdir) else None


def write_workdir_model_doc(workdir: str, doc: ModelDoc) -> None:
  write_model_doc(os.path.join(workdir, MODEL_CONFIG_FILE), doc)


def read_workdir_model_doc(workdir: str) -> ModelDoc:
  return read_model_doc(os.path.join(workdir, MODEL_CONFIG_FILE))


def load_workdir_model(workdir: str, step: int | None = None) -> CvT:
  """The model (eval mode) of a training workdir at `step` (default: its newest checkpoint)."""
  doc = read_workdir_model_doc(workdir)
  directory = os.path.join(files.absolute(workdir), CHECKPOINTS_DIR)
  manager = read_only_manager(directory, item_names=(STATE_ITEM,))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{workdir}: no complete checkpoint under {directory}.')
    model = abstract_model(doc.config)
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {'params': to_nested_dict(params), 'batch_stats': to_nested_dict(stats)}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)})
    try:
      restored = manager.restore(step, args=args)[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except  # tensorstore, JSON, OS, shape errors
      raise CheckpointError(f'{os.path.join(directory, str(step))}: cannot restore the model '
                            f'weights of step {step}: truncated, corrupt or another model\'s '
                            f'checkpoint ({type(e).__name__}: {str(e)[:300]}).') from e
  finally:
    manager.close()
  nnx.update(model, from_nested_dict(restored['params'], params),
             from_nested_dict(restored['batch_stats'], stats))
  finish_abstract_model(model).eval()
  return doc.apply(model)
