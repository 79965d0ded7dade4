"""A training run resolved from its config before the loop: steps, model, compute, mesh, state.

`build_run` allocates nothing; `create_initial_state` builds a fresh train state directly with its
shardings; `initial_or_restored_state` decides between a resume, an init_from and a fresh start.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cvt_flax import data, files, io
from cvt_flax.errors import ConfigError
from cvt_flax.io import workdir as workdir_io
from cvt_flax.models import Compute, CvT, CvTConfig, make_config
from cvt_flax.models import compute as compute_lib
from cvt_flax.models.weights import flat_variables, host_weights, shapes
from cvt_flax.runtime import compiler, sharding
from cvt_flax.training import checkpointing, init_from, optim
from cvt_flax.training.steps import TrainState, init_train_state


@dataclasses.dataclass
class Run:
  """Everything derived from the config once, before the loop."""
  config: ConfigDict
  workdir: str
  model_config: CvTConfig
  compute: Compute
  mesh: jax.sharding.Mesh
  total_steps: int
  steps_per_epoch: int
  dataset: data.DatasetInfo
  state_shardings: Any
  abstract_state: Any
  graphdef: Any
  eval_graphdef: Any
  tx: Any
  schedule: Any

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  def model_doc(self) -> io.ModelDoc:
    """What the workdir records of the model: architecture, eval transform, class names."""
    return io.ModelDoc(self.model_config, data.eval_preprocess(self.config.input),
                       self.dataset.class_names)


def resolve_num_steps(config: ConfigDict, num_train_examples: int) -> tuple[int, int]:
  """(total optimizer steps, steps per epoch) from `num_train_steps` or `num_epochs`."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  if config.num_epochs > 0:
    return int(math.ceil(config.num_epochs * steps_per_epoch)), steps_per_epoch
  raise ConfigError('config: set num_train_steps > 0 or num_epochs > 0.')


def resolve_model_config(config: ConfigDict, num_classes: int,
                         base: CvTConfig | None = None) -> CvTConfig:
  """config.model (a variant + overrides, or explicit fields) -> CvTConfig for this run.

  `variant='init_from'` takes the architecture of the init_from checkpoint (`base`), overridden by
  the other fields. The class count comes from the dataset.
  """
  fields = config.model.to_dict()
  if fields.get('num_classes', num_classes) != num_classes:
    raise ConfigError(f'config.model.num_classes={fields["num_classes"]}, but dataset '
                     f'{config.input.dataset!r} has {num_classes} classes; leave it unset.')
  fields['num_classes'] = num_classes
  if fields.get('variant') == 'init_from':
    if base is None:
      raise ConfigError("config.model.variant='init_from' needs config.init_from.")
    fields.pop('variant')
    return make_config(base, **fields)
  return make_config(fields)


def _model_fn(model_config: CvTConfig, compute: Compute, seed: int):
  return lambda: CvT(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), compute=compute)


def eval_batch_size(cfg: ConfigDict) -> int:
  return cfg.eval_batch_size if cfg.eval_batch_size > 0 else cfg.batch_size


def build_run(config: ConfigDict, workdir: str, base_model_config: CvTConfig | None = None,
              devices=None, dataset: data.DatasetInfo | None = None) -> Run:
  """Resolves steps, model, compute, optimizer, mesh and shardings (nothing is allocated yet).

  `devices`: the mesh's devices (default: all devices of all processes); the compute settings'
  'auto' choices are made for their platform. `dataset`: the dataset's classes and sizes
  (default: read from the configured dataset).
  """
  info = dataset or data.get_dataset_info(config.input)
  total_steps, steps_per_epoch = resolve_num_steps(config, info.num_train_examples)
  model_config = resolve_model_config(config, info.num_classes, base_model_config)
  mesh = sharding.make_mesh(devices)
  compute = Compute.from_config(config, mesh=mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  sharding.check_batch_size(eval_batch_size(config), mesh)
  schedule = optim.make_lr_schedule(config.optimizer, batch_size=config.batch_size,
                                    total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, schedule)
  abstract_model = nnx.eval_shape(_model_fn(model_config, compute, config.seed))
  graphdef = nnx.graphdef(abstract_model)
  abstract_model.eval()
  eval_graphdef = nnx.graphdef(abstract_model)
  abstract_state = jax.eval_shape(
      lambda: init_train_state(_model_fn(model_config, compute, 0)(), tx))
  shardings = sharding.state_shardings(abstract_state, mesh, fsdp=config.fsdp,
                                       fsdp_min_size=config.fsdp_min_size)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return Run(config=config, workdir=workdir, model_config=model_config, compute=compute, mesh=mesh,
             total_steps=total_steps, steps_per_epoch=steps_per_epoch, dataset=info,
             state_shardings=shardings, abstract_state=abstract_state, graphdef=graphdef,
             eval_graphdef=eval_graphdef, tx=tx, schedule=schedule)


def create_initial_state(run: Run, init_weights: dict[str, np.ndarray] | None = None) -> TrainState:
  """A fresh train state built directly with its shardings (never whole on one device).

  `init_weights` ('stage0.patch_embed.proj.kernel' -> array) replace the fresh values they name.
  """
  model_fn = _model_fn(run.model_config, run.compute, run.config.seed)

  def init(weights):
    model = model_fn()
    for key, var in flat_variables(model).items():
      if key in weights:
        var.set_value(jnp.asarray(weights[key], var.get_value().dtype))
    return init_train_state(model, run.tx)

  return compiler.jit(init, platform=run.platform, in_shardings=(sharding.replicated(run.mesh),),
                     out_shardings=run.state_shardings)(init_weights or {})


def init_weights_from(config: ConfigDict, run: Run, source: CvT) -> dict[str, np.ndarray]:
  """Checks the init_from model against the one being trained; returns the weights to copy."""
  target = nnx.eval_shape(_model_fn(run.model_config, run.compute, 0))
  return init_from.select_init_weights(host_weights(source), shapes(flat_variables(target)),
                                       new_head=config.init_new_head, source_name=config.init_from)


def initial_or_restored_state(config: ConfigDict, workdir: str, ckpt,
                              devices) -> tuple[Run, TrainState, int]:
  """(run, state, start step): the newest checkpoint of the workdir if it has one, else a fresh
  state, initialised from `config.init_from` if set."""
  latest = ckpt.latest_step()
  if latest is not None:
    saved = workdir_io.read_workdir_model_doc(workdir).config
    run = build_run(config, workdir, saved, devices)
    if run.model_config != saved:
      differences = '; '.join(saved.differences(run.model_config))
      raise checkpointing.CheckpointRestoreError(
          f'{workdir} holds checkpoints of another model: {differences} (checkpoint vs config). '
          'Resume with the config it was trained with, or use a new workdir. (Compute settings '
          'such as --config.dtype may change on resume; they are not part of the model.)')
    return run, ckpt.restore(latest, run.abstract_state), latest
  if not config.init_from:
    run = build_run(config, workdir, None, devices)
    return run, create_initial_state(run), 0
  source = init_from.load_source_model(config.init_from, config.init_from_spec)
  run = build_run(config, workdir, source.config, devices)
  weights = init_weights_from(config, run, source)
  del source
  return run, create_initial_state(run, weights), 0


def resolved_values(run: Run) -> dict[str, Any]:
  """What the trainer derived from the config for this run (train_config.json's "resolved")."""
  cfg = run.config
  return {'total_steps': run.total_steps, 'steps_per_epoch': run.steps_per_epoch,
          'warmup_steps': optim.warmup_steps(cfg.optimizer, run.steps_per_epoch),
          'peak_lr': optim.scaled_learning_rate(cfg.optimizer.base_lr, cfg.batch_size,
                                                cfg.optimizer.base_batch_size),
          'eval_split': cfg.input.eval_split or data.default_eval_split(cfg.input)}


def compute_choices(run: Run) -> dict[str, Any]:
  """The compute settings 'auto' resolved to on the run's devices, and per stage the path each op
  takes for the train batch and why (`cvt_flax.models.compute.choices`)."""
  settings = {f.name: getattr(run.compute, f.name) for f in dataclasses.fields(run.compute)
              if f.name != 'mesh'}
  size = run.config.input.image_size
  batch = run.config.batch_size // run.config.grad_accum_steps
  return {'settings': settings, 'devices': run.mesh.size, 'batch_per_step': batch,
          'stages': compute_lib.choices(run.compute, run.model_config, size, size, batch)}


def write_run_files(run: Run, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """WORKDIR/model_config.json (the model document), train_config.json (the config, its fields
  derived from others as the overrides left them, and the values the trainer derived under
  "resolved") and compute.json (`compute_choices`), written by process 0; returns what the last
  two record, (`resolved_values`, `compute_choices`), on every process."""
  resolved, choices = resolved_values(run), compute_choices(run)
  if jax.process_index() == 0:
    workdir_io.write_workdir_model_doc(workdir, run.model_doc())
    files.write_json(os.path.join(workdir, workdir_io.TRAIN_CONFIG_FILE),
                     {**run.config.to_dict(), 'resolved': resolved}, sort_keys=True)
    files.write_json(os.path.join(workdir, workdir_io.COMPUTE_FILE), choices)
  return resolved, choices
