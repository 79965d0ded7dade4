"""Evaluation over a whole dataset split, sharded over a mesh.

The trainer's periodic eval and `python -m cvt_flax.evaluate` run this same code: the same input
pipeline (`cvt_flax.data.make_eval_iterator`: the eval transform, padding with mask 0 so that each
example counts once, each process reading its own share), the same jitted step summing masked
top-1/top-5 hits and losses, and the same reduction.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cvt_flax import data
from cvt_flax.runtime import sharding


class Progress:
  """A progress line on stderr (`\\r`-rewritten): batches done, images/s."""

  def __init__(self, total_batches: int, batch_size: int, stream=sys.stderr):
    self.total, self.batch_size, self.stream = total_batches, batch_size, stream
    self.done, self._t0 = 0, time.perf_counter()

  def update(self) -> None:
    self.done += 1
    rate = self.done * self.batch_size / max(time.perf_counter() - self._t0, 1e-9)
    bar = '#' * (20 * self.done // max(self.total, 1))
    end = '\n' if self.done >= self.total else ''
    print(f'\r[{bar:<20}] {self.done}/{self.total} batches, {rate:.0f} img/s', end=end,
          file=self.stream, flush=True)


def evaluate_dataset(eval_step: Callable, variables: Any, input_cfg, *, batch_size: int,
                     mesh, progress: bool = False) -> dict[str, float]:
  """Top-1, top-5, mean loss and example count over `input_cfg.eval_split` (each example once).

  `variables`: what `eval_step` takes first (the model's params, batch stats and RNG state);
  `batch_size`: global, over all processes. Returns {'eval/top1', 'eval/top5', 'eval/loss',
  'eval/num_examples', 'eval/images_per_sec'}.
  """
  batch_sh = sharding.batch_sharding(mesh)
  batches = data.make_eval_iterator(input_cfg, global_batch_size=batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  bar = None
  if progress and jax.process_index() == 0:
    info = data.get_dataset_info(input_cfg)
    bar = Progress(data.num_eval_batches(info.num_eval_examples, batch_size,
                                         jax.process_count()), batch_size)
  totals, start = None, time.perf_counter()
  for local in batches:
    sums = eval_step(variables, sharding.global_batch(local, batch_sh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if bar:
      jax.block_until_ready(totals)
      bar.update()
  if totals is None:
    raise data.DataError(f'eval split {input_cfg.eval_split!r} of {input_cfg.dataset!r} is empty.')
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = totals['count']
  return {'eval/top1': totals['top1'] / count, 'eval/top5': totals['top5'] / count,
          'eval/loss': totals['loss'] / count, 'eval/num_examples': count,
          'eval/images_per_sec': count / (time.perf_counter() - start)}
