"""Metric logging: WORKDIR/metrics.jsonl, TensorBoard events, a console progress line; MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step (`step` = optimizer
steps completed). On resume from step k the file is kept, minus any records of steps after k (a run
killed after its last checkpoint logged steps that the resumed run computes again, identically).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from cvt_flax import files


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (helper for tests and notebooks).

  A last line without its newline that does not parse is a record whose write was cut short (the
  process was killed mid-write, or is writing it now); it is skipped. Any other bad line raises.
  """
  with open(path) as f:
    lines = f.readlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and not line.endswith('\n'):
        break
      raise ValueError(f'{path}, line {i + 1}: not a JSON record ({e}).') from e
  return records


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r['step'] <= step]
  files.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))


class MetricWriter:
  """Writes metrics to metrics.jsonl + TensorBoard (process 0) and a progress line to stdout."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps, self.start_step = total_steps, start_step
    self._t0 = time.perf_counter()
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    _truncate_after(path, start_step)
    self._jsonl = open(path, 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events of steps > start_step left by the interrupted run.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def progress(self, step: int, metrics: dict[str, float]) -> None:
    """One console line: bar, step, loss, lr, throughput, MFU, ETA (from the rate since start)."""
    if not self.enabled:
      return
    done = (step - self.start_step) / max(self.total_steps - self.start_step, 1)
    elapsed = time.perf_counter() - self._t0
    eta = elapsed / done * (1 - done) if done > 0 else float('nan')
    width = 20
    bar = '#' * int(width * step / self.total_steps)
    parts = [f'[{bar:<{width}}] step {step}/{self.total_steps}']
    for key, fmt in (('train/loss', '.4f'), ('train/lr', '.2e'), ('train/images_per_sec', '.0f'),
                     ('train/mfu', '.2%')):
      if key in metrics:
        parts.append(f'{key.split("/")[1]} {metrics[key]:{fmt}}')
    parts.append(f'ETA {_fmt_duration(eta)}')
    print(' | '.join(parts), flush=True)

  def log(self, message: str) -> None:
    if self.enabled:
      print(message, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def compiled_flops(compiled) -> float | None:
  """FLOPs one device executes per call of a compiled (SPMD-partitioned) executable, from XLA's
  cost analysis; None if the backend does not provide it.

  (Measured: a step costing 49.7 MFLOP on one CPU device reports 7.7 MFLOP per device on eight.)
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backends may not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def mfu(flops_per_device_step: float | None, steps_per_sec: float,
        peak_flops_per_device: float) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak FLOP/s.

  The FLOPs are XLA's count for the compiled step, so they include the backward pass, the
  optimizer and any recomputation, and count a multiply-add as 2 FLOPs.
  """
  if not flops_per_device_step or peak_flops_per_device <= 0:
    return None
  return flops_per_device_step * steps_per_sec / peak_flops_per_device


class StepTrace:
  """A `jax.profiler` trace of `num_steps` train steps, from step `first` on, into `directory`
  (TensorBoard's profile plugin / XProf read it: `tensorboard --logdir WORKDIR`). Each process
  traces its own host and devices. `num_steps` 0 traces nothing."""

  def __init__(self, directory: str, first: int, num_steps: int):
    self.directory, self.first, self.last = directory, first, first + num_steps - 1
    self.active = False

  def annotation(self, step: int):
    """The context of one step: starts the trace at `first`; marks steps in the trace viewer."""
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def after(self, step: int, outputs) -> None:
    """Ends the trace after step `last` (once its outputs are computed)."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False

  def __enter__(self) -> 'StepTrace':
    return self

  def __exit__(self, *exc_info) -> None:
    if self.active:  # the run ended (or failed) inside the traced steps
      jax.profiler.stop_trace()
      self.active = False
