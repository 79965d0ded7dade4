"""Metric logging: WORKDIR/metrics.jsonl, TensorBoard events, a console progress line; MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step (`step` = optimizer
steps completed). On resume from step k the file is kept, minus any records of steps after k (a run
killed after its last checkpoint logged steps that the resumed run computes again, identically).

A Cloud Storage object cannot be appended to, so for a `gs://` workdir both files are written in
a local staging directory and uploaded whole (`_StagedFiles`): at most every `SYNC_EVERY_S`
seconds, after each checkpoint and at the end. The workdir's copy is then never half a record,
and it holds every step up to the newest checkpoint; a killed run loses only what it logged after
that, which its resumed run logs again.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax

from cvt_flax import files
from cvt_flax.io.workdir import METRICS_FILE, TENSORBOARD_DIR
from cvt_flax.runtime import compiler


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
  lines = files.read_text(path).splitlines(keepends=True)
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
  if not files.exists(path):
    return
  kept = [r for r in read_metrics(path) if r['step'] <= step]
  files.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))


SYNC_EVERY_S = 30.0


class _StagedFiles:
  """A local directory whose files are uploaded whole to a remote workdir, changed ones only."""

  def __init__(self, workdir: str):
    self.workdir, self.local = workdir, tempfile.mkdtemp(prefix='cvt-flax-workdir-')
    self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded
    self._last_sync = time.monotonic()

  def download(self, name: str) -> None:
    remote = os.path.join(self.workdir, name)
    if files.exists(remote):
      files.write_text(os.path.join(self.local, name), files.read_text(remote))
      self._uploaded[name] = self._stamp(name)

  def _stamp(self, name: str) -> tuple[int, int]:
    stat = os.stat(os.path.join(self.local, name))
    return stat.st_size, stat.st_mtime_ns

  def sync(self, *, force: bool = True) -> None:
    if not force and time.monotonic() - self._last_sync < SYNC_EVERY_S:
      return
    for root, _, names in os.walk(self.local):
      for name in names:
        local = os.path.join(root, name)
        relative = os.path.relpath(local, self.local)
        stamp = self._stamp(relative)
        if self._uploaded.get(relative) != stamp:
          files.atomic_write(os.path.join(self.workdir, relative),
                             lambda tmp, src=local: shutil.copyfile(src, tmp))
          self._uploaded[relative] = stamp
    self._last_sync = time.monotonic()

  def close(self) -> None:
    try:
      self.sync()
    finally:
      shutil.rmtree(self.local, ignore_errors=True)


class MetricWriter:
  """Writes metrics to metrics.jsonl + TensorBoard (process 0) and a progress line to stdout."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps, self.start_step = total_steps, start_step
    self._t0 = time.perf_counter()
    self._jsonl = self._tb = self._staged = None
    if not self.enabled:
      return
    if files.is_remote(workdir):  # truncated in the local copy, which is then uploaded
      self._staged = _StagedFiles(workdir)
      self._staged.download(METRICS_FILE)
      workdir = self._staged.local
    _truncate_after(os.path.join(workdir, METRICS_FILE), start_step)
    if self._staged:
      self._staged.sync()
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events of steps > start_step left by the interrupted run.
    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
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
    if self._staged:
      self._staged.sync(force=False)

  def sync(self) -> None:
    """Uploads what was written to a remote workdir (nothing to do for a local one)."""
    if self._staged:
      self._staged.sync()

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

  def close(self, *, failing: bool = False) -> None:
    """Closes the files (and uploads them to a remote workdir). `failing`: the run is already
    failing with its own error, so an upload error is printed, not raised over it."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._staged is not None:
      staged, self._staged = self._staged, None
      try:
        staged.close()
      except Exception as e:  # pylint: disable=broad-except  # storage client errors
        if not failing:
          raise
        print(f'warning: the metrics of this run could not be uploaded to {staged.workdir} '
              f'({type(e).__name__}: {str(e)[:200]})', file=sys.stderr, flush=True)


def compiled_flops(compiled) -> float | None:
  """FLOPs one device executes per call of a compiled (SPMD-partitioned) executable, from XLA's
  cost analysis; None if the backend does not provide it.

  (Measured: a step costing 49.7 MFLOP on one CPU device reports 7.7 MFLOP per device on eight.)
  """
  try:
    flops = compiler.cost_analysis(compiled).get('flops')
  except Exception:  # pylint: disable=broad-except  # backends may not implement it
    return None
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
