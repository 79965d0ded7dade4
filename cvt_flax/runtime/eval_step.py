"""A model as the pure functions see it, and the eval step (no TensorFlow, no optimizer state).

Functional NNX: a model is split into (graphdef, params, batch_stats, rngs); the graphdef is static
and the three states are pytrees that flow through `jax.jit`. The trainer's train step and eval, and
`python -m cvt_flax.evaluate`, all split models this way.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cvt_flax.preprocess import normalize
from cvt_flax.runtime import compiler
from cvt_flax.runtime import sharding

# Every variable of a CvT is one of these; nnx.split raises if a new kind ever appears unhandled.
MODEL_FILTERS = (nnx.Param, nnx.BatchStat, nnx.RngState)


def split_model(model: nnx.Module):
  """-> (graphdef, params, batch_stats, rngs)."""
  return nnx.split(model, *MODEL_FILTERS)


def make_eval_step(eval_graphdef, *, mean, std) -> Callable:
  """Returns `eval_step(variables, batch) -> sums` of masked top-1/top-5 hits, loss and example
  count, where `variables` = (params, batch_stats, rngs) as `split_model` returns them, and
  `batch` = {'image': pixels 0-255 (uint8 from the input pipeline), 'label', 'mask'}; the step
  normalises the pixels by `mean`/`std` (`cvt_flax.preprocess.normalize`).

  `eval_graphdef` is the graphdef of the model in eval mode (running BatchNorm statistics, no
  dropout). Sums (not means) so that padded batches and several processes add up exactly.
  """

  def eval_step(variables, batch: dict[str, jax.Array]):
    model = nnx.merge(eval_graphdef, *variables)
    logits = model(normalize(batch['image'], mean, std))
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hit1 = (top[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'top1': jnp.sum(hit1 * mask), 'top5': jnp.sum(hit5 * mask),
            'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}

  return eval_step


def jit_eval_step(eval_graphdef, variables_shardings, mesh, *, mean, std) -> Callable:
  """`make_eval_step` jitted for `mesh`: variables as sharded, batches split over 'data'."""
  return compiler.jit(make_eval_step(eval_graphdef, mean=mean, std=std),
                     platform=mesh.devices.flat[0].platform,
                     in_shardings=(variables_shardings, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.replicated(mesh))
