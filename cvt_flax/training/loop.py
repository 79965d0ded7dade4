"""Training and evaluation of CvT: model, data, optimizer, mesh and checkpoints brought together.

`train_and_evaluate(config, workdir)` trains as `config` says (see `configs/*.py` for the fields),
resuming from the newest checkpoint in `workdir` if there is one.

Determinism. On the same devices and software, a run is a pure function of the config: the batch
of step t is a function of (input config, seed, t, process layout) (see `cvt_flax.data`), mixup /
cutmix use `fold_in(key(seed), t)`, and the dropout / stochastic-depth RNG streams, the optimizer
state and the BatchNorm statistics are in the checkpoint. So a run stopped at step k and resumed
reproduces the uninterrupted run's losses bit for bit (tests/test_train_resume.py). Not bitwise
across device counts or FSDP on/off: the same math and the same random draws, but XLA splits float
reductions differently, so results agree to rounding (the bound is in tests/test_sharding.py,
the measured figure in the README) and may drift apart slowly over a long run. Not
deterministic across process counts (each process reads a different share of the data) and across
XLA versions or backends.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cvt_flax import data, files
from cvt_flax.errors import EXPECTED_ERRORS, CvtFlaxError
from cvt_flax.io import workdir as workdir_io
from cvt_flax.models import compute as compute_lib
from cvt_flax.runtime import compiler
from cvt_flax.runtime import eval_step as eval_step_lib, evaluation, sharding
from cvt_flax.training import checkpointing, metrics as metrics_lib
from cvt_flax.training import config as config_lib
from cvt_flax.training.run import Run, eval_batch_size, initial_or_restored_state, write_run_files
from cvt_flax.training.steps import TrainState, make_train_step, model_variables


class TrainingDivergedError(CvtFlaxError, RuntimeError):
  """The loss or the gradients became NaN/Inf. The message names the step and the metric."""


# ----------------------------------------------------------------------------------------------------
# Evaluation.

def evaluate(run: Run, state: TrainState, eval_step) -> dict[str, float]:
  """Top-1/top-5/loss over the whole eval split; padded examples (mask 0) do not count."""
  return evaluation.evaluate_dataset(eval_step, model_variables(state), run.config.input,
                                     batch_size=eval_batch_size(run.config), mesh=run.mesh)


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


def train_batch_spec(cfg: ConfigDict, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch as the input pipeline makes it (`cvt_flax.data.make_train_iterator`): uint8
  pixels, int32 labels, and random erasing's int32 boxes if the config erases."""
  size, batch = cfg.input.image_size, cfg.batch_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  out = {'image': spec((batch, size, size, 3), jnp.uint8), 'label': spec((batch,), jnp.int32)}
  if cfg.input.random_erasing > 0:
    out['erase'] = spec((batch, 4), jnp.int32)
  return out


def compile_train_step(run: Run):
  """The train step compiled for the run's mesh: state and batch sharded as the run says, the
  state donated."""
  cfg = run.config
  batch_sh = sharding.batch_sharding(run.mesh)
  micro_sh = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
  step_fn = make_train_step(run.graphdef, run.tx, run.schedule, num_classes=run.num_classes,
                            mixup=dict(cfg.mixup), seed=cfg.seed, mean=cfg.input.mean,
                            std=cfg.input.std, grad_accum_steps=cfg.grad_accum_steps,
                            microbatch_sharding=micro_sh)
  return compiler.compile_ahead(step_fn, run.abstract_state, train_batch_spec(cfg, batch_sh),
                                platform=run.platform, in_shardings=(run.state_shardings, batch_sh),
                                out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                                donate_argnums=(0,))


def train_and_evaluate(config: ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
  """Trains and evaluates; returns the final eval metrics (plus `step`, and `preempted` if so).

  `devices`: the devices to train on (default: all devices of all processes).
  """
  config_lib.validate_config(config)
  ckpt, run, state, start, (resolved, choices) = _start(config, workdir, devices)
  writer = metrics_lib.MetricWriter(workdir, total_steps=run.total_steps, start_step=start)
  writer.log(f'CvT {run.model_config.dim_embed}x{run.model_config.depth}: '
             f'{run.total_steps} steps ({run.steps_per_epoch}/epoch, warmup '
             f'{resolved["warmup_steps"]}, peak lr {resolved["peak_lr"]:.3g}) on {run.mesh.size} '
             f'devices, {jax.process_count()} processes; '
             + (f'resuming at step {start}' if start else 'starting at step 0'))
  writer.log(f"compute ({choices['settings']['dtype']} on {run.platform}, "
             f"{workdir_io.COMPUTE_FILE}):")
  for line in compute_lib.describe_choices(choices['stages']):
    writer.log(f'  {line}')
  stop = checkpointing.StopSignal()
  failing = True
  try:
    result = _train_loop(run, state, start, ckpt, writer, stop)
    failing = False
    return result
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and not isinstance(e, EXPECTED_ERRORS):
      # Printed now: the cleanup below may wait on the dead peer until JAX ends this process.
      print(_peer_failure_hint(e, ckpt.latest_step()), file=sys.stderr, flush=True)
    raise
  finally:
    try:
      ckpt.wait()
      ckpt.close()
    except BaseException:
      failing = True
      raise
    finally:
      writer.close(failing=failing)
      stop.restore_handler()


def _start(config: ConfigDict, workdir: str, devices):
  """(checkpointer, run, state, start step, what the run's files record: `write_run_files`). A
  workdir this made is removed again if the run fails before it starts (a missing dataset, a bad
  init_from)."""
  fresh = not files.is_remote(workdir) and not files.exists(workdir)
  checkpointing.prepare_workdir(workdir)  # an unwritable workdir fails here, before any work
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, workdir_io.CHECKPOINTS_DIR),
                                    keep=config.keep_checkpoints, async_save=config.checkpoint_async)
  try:
    run, state, start = initial_or_restored_state(config, workdir, ckpt, devices)
    checkpointing.check_free_space(ckpt.directory, checkpointing.state_nbytes(run.abstract_state))
    recorded = write_run_files(run, workdir)
  except BaseException:
    ckpt.close()
    if fresh:
      checkpointing.remove_unused_workdir(workdir)
    raise
  return ckpt, run, state, start, recorded


def _peer_failure_hint(error: Exception, newest: int | None) -> str:
  saved = f'step {newest}' if newest is not None else 'none yet'
  return (f'ERROR: process {jax.process_index()} of {jax.process_count()}: '
          f'{type(error).__name__}: {str(error)[:500]}\nIf this is a failed cross-process step, '
          'another process has probably died or been preempted: see its log. The JAX distributed '
          'runtime ends the remaining processes within the heartbeat timeout '
          '(--distributed_heartbeat_timeout). Restart all processes with the same command; they '
          f'resume from the newest checkpoint ({saved}).')


def _train_loop(run: Run, state: TrainState, start: int, ckpt, writer, stop) -> dict[str, Any]:
  eval_step = eval_step_lib.jit_eval_step(run.eval_graphdef,
                                          model_variables(run.state_shardings), run.mesh,
                                          mean=run.config.input.mean, std=run.config.input.std)
  if start >= run.total_steps:  # nothing left to train: evaluate what the workdir holds
    record = _evaluate(run, state, eval_step, start, writer)
  else:
    record = _run_steps(run, state, start, ckpt, writer, stop, eval_step)
    if record.get('preempted'):
      return record
  step = max(start, run.total_steps)
  writer.log(f'Final evaluation at step {step}: top-1 {record["eval/top1"]:.2%}, '
             f'top-5 {record["eval/top5"]:.2%} on {int(record["eval/num_examples"])} images.')
  # Timings go to metrics.jsonl; the result holds only what the run computed.
  return {'step': step, **{k: float(v) for k, v in record.items()
                           if k.startswith('eval/') and k != 'eval/images_per_sec'}}


def _run_steps(run: Run, state: TrainState, start: int, ckpt, writer, stop, eval_step) -> dict:
  """Steps start+1..total; returns the last step's metrics record, or {'preempted': True, ...}."""
  cfg, total = run.config, run.total_steps
  t_compile = time.perf_counter()
  train_step = compile_train_step(run)
  flops = metrics_lib.compiled_flops(train_step)
  writer.log(f'train step compiled in {time.perf_counter() - t_compile:.1f}s'
             + (f', {flops / 1e9:.3g} GFLOP per step and device' if flops else ''))
  batch_sh = sharding.batch_sharding(run.mesh)
  batches: Iterator = data.make_train_iterator(
      cfg.input, global_batch_size=cfg.batch_size, seed=cfg.seed, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count())
  step_metrics = _StepMetrics(run, flops, ckpt.latest_step())
  trace = metrics_lib.StepTrace(os.path.join(run.workdir, workdir_io.PROFILE_DIR), start + 2,
                                cfg.profile_steps)
  record = {}
  with trace:
    for step in range(start + 1, total + 1):  # `step` = optimizer steps completed after this one
      with trace.annotation(step):
        state, m = train_step(state, sharding.global_batch(next(batches), batch_sh))
      trace.after(step, m)
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
        writer.sync()
      if step < total and stop.should_stop(ckpt, step):
        _save(ckpt, step, state, step_metrics)
        ckpt.wait()
        writer.sync()
        writer.log(f'Preempted: saved a checkpoint at step {step}; rerun the same command to '
                   'resume.')
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
