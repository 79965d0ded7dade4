"""Training and evaluation of CvT: model, data, optimizer, mesh and checkpoints brought together.

`train_and_evaluate(config, workdir)` trains as `config` says (see `configs/*.py` for the fields),
resuming from the newest checkpoint in `workdir` if there is one.

Determinism. On the same devices and software, a run is a pure function of the config: the batch
of step t is a function of (input config, seed, t, process layout) (see `cvt_flax.data`), mixup /
cutmix use `fold_in(key(seed), t)`, and the dropout / stochastic-depth RNG streams, the optimizer
state and the BatchNorm statistics are in the checkpoint. So a run stopped at step k and resumed
reproduces the uninterrupted run's losses bit for bit (tests/test_train_resume.py). Not bitwise
across device counts or FSDP on/off: the same math and the same random draws, but XLA splits float
reductions differently, so results agree to rounding (<= 1.1e-7 relative over 6 steps on 8
simulated CPU devices, tests/test_sharding.py) and may drift apart slowly over a long run. Not
deterministic across process counts (each process reads a different share of the data) and across
XLA versions or backends.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cvt_flax import data
from cvt_flax.checkpoint import CheckpointError
from cvt_flax.convert.official import ConversionError
from cvt_flax.models import CvT, CvTConfig, compiler_options, make_config, release_freed_memory
from cvt_flax.training import checkpointing, init_from, metrics as metrics_lib, optim, sharding
from cvt_flax.training import config as config_lib
from cvt_flax.training.steps import TrainState, init_train_state, make_eval_step, make_train_step


class TrainingDivergedError(RuntimeError):
  """The loss or the gradients became NaN/Inf. The message names the step and the metric."""


# Failures caused by the input (config, files, data, disk) rather than by a bug: each message names
# the file / key / step and what to do, so `train.py` prints it without a traceback.
EXPECTED_ERRORS = (TrainingDivergedError, checkpointing.CheckpointSaveError,
                   checkpointing.CheckpointRestoreError, checkpointing.WorkdirError,
                   init_from.InitFromError, data.DataError, CheckpointError, ConversionError)


@dataclasses.dataclass
class Run:
  """Everything derived from the config once, before the loop."""
  config: ConfigDict
  workdir: str
  model_config: CvTConfig
  mesh: jax.sharding.Mesh
  total_steps: int
  steps_per_epoch: int
  num_classes: int
  state_shardings: Any
  abstract_state: Any
  graphdef: Any
  eval_graphdef: Any
  tx: Any
  schedule: Any


def resolve_num_steps(config: ConfigDict, num_train_examples: int) -> tuple[int, int]:
  """(total optimizer steps, steps per epoch) from `num_train_steps` or `num_epochs`."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  if config.num_epochs > 0:
    return int(math.ceil(config.num_epochs * steps_per_epoch)), steps_per_epoch
  raise ValueError('config: set num_train_steps > 0 or num_epochs > 0.')


def resolve_model_config(config: ConfigDict, num_classes: int,
                         base: CvTConfig | None = None) -> CvTConfig:
  """config.model (a variant + overrides, or explicit fields) -> CvTConfig for this run.

  `variant='init_from'` takes the architecture of the init_from checkpoint (`base`), overridden by
  the other fields. The class count comes from the dataset and the dtype from `config.dtype`.
  """
  fields = config.model.to_dict()
  if fields.get('num_classes', num_classes) != num_classes:
    raise ValueError(f'config.model.num_classes={fields["num_classes"]}, but dataset '
                     f'{config.input.dataset!r} has {num_classes} classes; leave it unset.')
  fields.update(num_classes=num_classes, dtype=config.dtype)
  if fields.get('variant') == 'init_from':
    if base is None:
      raise ValueError("config.model.variant='init_from' needs config.init_from.")
    fields.pop('variant')
    return make_config(base, **fields)
  return make_config(fields)


def _model_fn(model_config: CvTConfig, seed: int):
  return lambda: CvT(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def build_run(config: ConfigDict, workdir: str, base_model_config: CvTConfig | None = None,
              devices=None) -> Run:
  """Resolves steps, model, optimizer, mesh and shardings (nothing is allocated yet).

  `devices`: the mesh's devices (default: all devices of all processes).
  """
  info = data.get_dataset_info(config.input)
  total_steps, steps_per_epoch = resolve_num_steps(config, info.num_train_examples)
  model_config = resolve_model_config(config, info.num_classes, base_model_config)
  mesh = sharding.make_mesh(devices)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  sharding.check_batch_size(_eval_batch_size(config), mesh)
  schedule = optim.make_lr_schedule(config.optimizer, batch_size=config.batch_size,
                                    total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, schedule)
  abstract_model = nnx.eval_shape(_model_fn(model_config, config.seed))
  graphdef = nnx.graphdef(abstract_model)
  abstract_model.eval()
  eval_graphdef = nnx.graphdef(abstract_model)
  abstract_model.train()
  abstract_state = jax.eval_shape(lambda: init_train_state(_model_fn(model_config, 0)(), tx))
  shardings = sharding.state_shardings(abstract_state, mesh, fsdp=config.fsdp,
                                       fsdp_min_size=config.fsdp_min_size)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return Run(config=config, workdir=workdir, model_config=model_config, mesh=mesh,
             total_steps=total_steps, steps_per_epoch=steps_per_epoch,
             num_classes=info.num_classes, state_shardings=shardings,
             abstract_state=abstract_state, graphdef=graphdef, eval_graphdef=eval_graphdef,
             tx=tx, schedule=schedule)


def create_initial_state(run: Run, init_weights: dict[str, np.ndarray] | None = None) -> TrainState:
  """A fresh train state built directly with its shardings (never whole on one device).

  `init_weights` ('stage0.patch_embed.proj.kernel' -> array) replace the fresh values they name.
  """
  model_fn = _model_fn(run.model_config, run.config.seed)

  def init(weights):
    model = model_fn()
    if weights:
      state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
      for path, var in nnx.to_flat_state(state):
        key = '.'.join(str(p) for p in path)
        if key in weights:
          var.value = jnp.asarray(weights[key], var.value.dtype)
      nnx.update(model, state)
    return init_train_state(model, run.tx)

  weights = init_weights or {}
  return jax.jit(init, in_shardings=(sharding.replicated(run.mesh),),
                 out_shardings=run.state_shardings)(weights)


def init_weights_from(config: ConfigDict, model_config: CvTConfig, source) -> dict[str, np.ndarray]:
  """Checks the init_from model against the one being trained; returns the weights to copy."""
  target = nnx.eval_shape(_model_fn(model_config, 0))
  target_shapes = {k: v.shape for k, v in init_from.flat_weights(target).items()}
  return init_from.select_init_weights(init_from.host_weights(source), target_shapes,
                                       new_head=config.init_new_head, source_name=config.init_from)


# ----------------------------------------------------------------------------------------------------
# Evaluation.

def evaluate(run: Run, state: TrainState, eval_step) -> dict[str, float]:
  """Top-1/top-5/loss over the whole eval split; padded examples (mask 0) do not count."""
  cfg = run.config
  batch_sh = sharding.batch_sharding(run.mesh)
  batches = data.make_eval_iterator(cfg.input, global_batch_size=_eval_batch_size(cfg),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  totals = None
  for local in batches:
    sums = eval_step(state, sharding.global_batch(local, batch_sh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'eval split {cfg.input.eval_split!r} of {cfg.input.dataset!r} is empty.')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval/top1': totals['top1'] / count, 'eval/top5': totals['top5'] / count,
          'eval/loss': totals['loss'] / count, 'eval/num_examples': count}


def _eval_batch_size(cfg: ConfigDict) -> int:
  return cfg.eval_batch_size if cfg.eval_batch_size > 0 else cfg.batch_size


# ----------------------------------------------------------------------------------------------------
# The training loop.

class _StepMetrics:
  """Per-step metrics stay on device until a log/checkpoint point; then one transfer checks them."""

  def __init__(self, run: Run, flops_per_step: float | None, last_saved: int | None):
    self.run, self.flops, self.last_saved = run, flops_per_step, last_saved
    self.pending: list[tuple[int, dict]] = []
    self.reset_timer()

  def reset_timer(self):
    self._t0, self._steps = time.perf_counter(), 0

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))
    self._steps += 1

  def check(self) -> dict[str, float] | None:
    """Fetches the pending metrics, raises on NaN/Inf; returns the newest step's, with throughput."""
    if not self.pending:
      return None
    values = jax.device_get([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, values):
      for name in ('loss', 'grad_norm'):
        if not np.isfinite(m[name]):
          raise TrainingDivergedError(self._diverged_message(step, name, m[name]))
    step, last = self.pending[-1][0], values[-1]
    self.pending = []
    elapsed = time.perf_counter() - self._t0
    steps_per_sec = self._steps / elapsed if elapsed > 0 else float('nan')
    out = {f'train/{k}': float(v) for k, v in last.items()}
    out['train/epoch'] = step / self.run.steps_per_epoch
    out['train/images_per_sec'] = steps_per_sec * self.run.config.batch_size
    mfu = metrics_lib.mfu(self.flops, steps_per_sec, self.run.config.peak_flops_per_device)
    if mfu is not None:
      out['train/mfu'] = mfu
    self.reset_timer()
    return out

  def _diverged_message(self, step, name, value) -> str:
    saved = (f'step {self.last_saved}' if self.last_saved is not None else 'none was written')
    return (f'Training diverged: train/{name} is {value} at step {step} of '
            f'{self.run.total_steps}. Stopped without saving; the newest checkpoint ({saved}) is '
            'the last good one. Hints: lower the learning rate (--config.optimizer.base_lr), '
            'check the input data (NaN/Inf or unnormalised images), or train in float32 '
            '(--config.dtype=float32).')


def _compile_train_step(run: Run):
  cfg = run.config
  batch_sh = sharding.batch_sharding(run.mesh)
  micro_sh = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
  step_fn = make_train_step(run.graphdef, run.tx, run.schedule, num_classes=run.num_classes,
                            mixup=dict(cfg.mixup), seed=cfg.seed,
                            grad_accum_steps=cfg.grad_accum_steps, microbatch_sharding=micro_sh)
  jitted = jax.jit(step_fn, in_shardings=(run.state_shardings, batch_sh),
                   out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                   donate_argnums=(0,), compiler_options=compiler_options())
  size = cfg.input.image_size
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((cfg.batch_size, size, size, 3), jnp.float32, sharding=batch_sh),
      'label': jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=batch_sh)}
  compiled = jitted.lower(run.abstract_state, abstract_batch).compile()
  release_freed_memory()  # the compiler's, before the step's buffers come on top of it
  return compiled


def _initial_or_restored_state(config: ConfigDict, workdir: str, ckpt,
                               devices) -> tuple[Run, TrainState, int]:
  latest = ckpt.latest_step()
  if latest is not None:
    saved = checkpointing.read_model_config(workdir)
    run = build_run(config, workdir, saved, devices)
    if run.model_config != saved:
      raise checkpointing.CheckpointRestoreError(
          f'{workdir} holds checkpoints of another model ({saved}); the config asks for '
          f'{run.model_config}. Use a new workdir.')
    return run, ckpt.restore(latest, run.abstract_state), latest
  if not config.init_from:
    run = build_run(config, workdir, None, devices)
    return run, create_initial_state(run), 0
  source = init_from.load_source_model(config.init_from, config.init_from_spec)
  run = build_run(config, workdir, source.config, devices)
  weights = init_weights_from(config, run.model_config, source)
  del source
  return run, create_initial_state(run, weights), 0


def train_and_evaluate(config: ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
  """Trains and evaluates; returns the final eval metrics (plus `step`, and `preempted` if so).

  `devices`: the devices to train on (default: all devices of all processes).
  """
  config_lib.validate_config(config)
  checkpointing.prepare_workdir(workdir)  # an unwritable workdir fails here, before any work
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.keep_checkpoints, async_save=config.checkpoint_async)
  run, state, start = _initial_or_restored_state(config, workdir, ckpt, devices)
  checkpointing.check_free_space(ckpt.directory, checkpointing.state_nbytes(run.abstract_state))
  if jax.process_index() == 0:
    checkpointing.write_model_config(workdir, run.model_config)
    checkpointing.write_json(os.path.join(workdir, 'train_config.json'), config.to_dict())
  writer = metrics_lib.MetricWriter(workdir, total_steps=run.total_steps, start_step=start)
  writer.log(f'CvT {run.model_config.dim_embed}x{run.model_config.depth}: '
             f'{run.total_steps} steps ({run.steps_per_epoch}/epoch) on {run.mesh.size} devices, '
             f'{jax.process_count()} processes; ' + (f'resuming at step {start}' if start else
                                                    'starting at step 0'))
  stop = checkpointing.StopSignal()
  try:
    return _train_loop(run, state, start, ckpt, writer, stop)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and not isinstance(e, EXPECTED_ERRORS):
      # Printed now: the cleanup below may wait on the dead peer until JAX ends this process.
      print(_peer_failure_hint(e, ckpt.latest_step()), file=sys.stderr, flush=True)
    raise
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    stop.restore_handler()


def _peer_failure_hint(error: Exception, newest: int | None) -> str:
  saved = f'step {newest}' if newest is not None else 'none yet'
  return (f'ERROR: process {jax.process_index()} of {jax.process_count()}: '
          f'{type(error).__name__}: {str(error)[:500]}\nIf this is a failed cross-process step, '
          'another process has probably died or been preempted: see its log. The JAX distributed '
          'runtime ends the remaining processes within the heartbeat timeout '
          '(--distributed_heartbeat_timeout). Restart all processes with the same command; they '
          f'resume from the newest checkpoint ({saved}).')


def _train_loop(run: Run, state: TrainState, start: int, ckpt, writer, stop) -> dict[str, Any]:
  eval_step = jax.jit(make_eval_step(run.eval_graphdef),
                      in_shardings=(run.state_shardings, sharding.batch_sharding(run.mesh)),
                      out_shardings=sharding.replicated(run.mesh),
                      compiler_options=compiler_options())
  if start >= run.total_steps:  # nothing left to train: evaluate what the workdir holds
    record = _evaluate(run, state, eval_step, start, writer)
  else:
    record = _run_steps(run, state, start, ckpt, writer, stop, eval_step)
    if record.get('preempted'):
      return record
  step = max(start, run.total_steps)
  writer.log(f'Final evaluation at step {step}: top-1 {record["eval/top1"]:.2%}, '
             f'top-5 {record["eval/top5"]:.2%} on {int(record["eval/num_examples"])} images.')
  return {'step': step, **{k: float(v) for k, v in record.items() if k.startswith('eval/')}}


def _run_steps(run: Run, state: TrainState, start: int, ckpt, writer, stop, eval_step) -> dict:
  """Steps start+1..total; returns the last step's metrics record, or {'preempted': True, ...}."""
  cfg, total = run.config, run.total_steps
  t_compile = time.perf_counter()
  train_step = _compile_train_step(run)
  flops = metrics_lib.compiled_flops(train_step)
  writer.log(f'train step compiled in {time.perf_counter() - t_compile:.1f}s'
             + (f', {flops / 1e9:.3g} GFLOP per step and device' if flops else ''))
  batch_sh = sharding.batch_sharding(run.mesh)
  batches: Iterator = data.make_train_iterator(
      cfg.input, global_batch_size=cfg.batch_size, seed=cfg.seed, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count())
  step_metrics = _StepMetrics(run, flops, ckpt.latest_step())
  for step in range(start + 1, total + 1):  # `step` = optimizer steps completed after this one
    state, m = train_step(state, sharding.global_batch(next(batches), batch_sh))
    step_metrics.add(step, m)
    record = {}  # one metrics.jsonl object per logged step, train and eval together
    if step % cfg.log_every_steps == 0 or step == total:
      record.update(step_metrics.check())
      writer.progress(step, record)
    if (cfg.eval_every_steps > 0 and step % cfg.eval_every_steps == 0) or step == total:
      record.update(_evaluate(run, state, eval_step, step, writer))
      step_metrics.reset_timer()
    if record:
      writer.write(step, record)
    if step % cfg.checkpoint_every_steps == 0 or step == total:
      _save(ckpt, step, state, step_metrics)
    if step < total and stop.should_stop(ckpt, step):
      _save(ckpt, step, state, step_metrics)
      ckpt.wait()
      writer.log(f'Preempted: saved a checkpoint at step {step}; rerun the same command to resume.')
      return {'step': step, 'preempted': True}
  return record


def _save(ckpt, step: int, state: TrainState, step_metrics: _StepMetrics) -> None:
  """Never saves a state that follows a NaN/Inf step: the pending metrics are checked first."""
  step_metrics.check()
  ckpt.save(step, state)
  step_metrics.last_saved = step


def _evaluate(run: Run, state: TrainState, eval_step, step: int, writer) -> dict:
  result = evaluate(run, state, eval_step)
  writer.log(f'eval at step {step}: top-1 {result["eval/top1"]:.2%}, '
             f'top-5 {result["eval/top5"]:.2%}')
  return result
