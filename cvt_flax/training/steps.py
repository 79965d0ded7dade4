"""Train state and the pure train/eval step functions (functional NNX: split -> jit -> merge).

The model lives as (graphdef, params, batch_stats, rngs): the graphdef is static; the three states
are pytrees that flow through `jax.jit` with the optimizer state and the step counter.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from cvt_flax.preprocess import normalize
from cvt_flax.runtime.eval_step import split_model
from cvt_flax.training.erasing import fill_boxes
from cvt_flax.training.mixup import mixup_cutmix


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. Checkpointing this is enough for an exact resume."""
  step: jax.Array          # int32 scalar: optimizer steps completed
  params: nnx.State        # nnx.Param (float32 master weights)
  batch_stats: nnx.State   # BatchNorm running statistics and counters
  rngs: nnx.State          # the dropout / stochastic-depth RNG streams inside the model
  opt_state: Any


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  _, params, batch_stats, rngs = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    rngs=rngs, opt_state=tx.init(params))


def _microbatches(tree, num: int, sharding: NamedSharding | None):
  """(B, ...) -> (num, B/num, ...) taking every num-th example, so each device keeps its own rows."""
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    num_classes: int, mixup: dict[str, float], seed: int, mean, std,
                    grad_accum_steps: int = 1,
                    microbatch_sharding: NamedSharding | None = None) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`, pure and jit-able.

  `batch`: {'image': pixels 0-255 (uint8 from the input pipeline), 'label'}, and 'erase' (boxes,
  `erasing.fill_boxes`) if the input config erases. The step normalises by `mean`/`std` (0-1 units,
  `cvt_flax.preprocess.normalize`), fills the boxes with noise, then mixes.
  Mixup/CutMix and the erasing noise draw from `fold_in(key(seed), step)`: a function of the step,
  so they survive a resume. Dropout randomness comes from the RNG streams in `state.rngs`. With
  grad_accum_steps = A, mixup is applied to the whole global batch, then the gradient is the mean over A equal
  microbatches, which equals the big-batch gradient except for BatchNorm (statistics per microbatch,
  running stats updated A times, as accumulation in PyTorch does).
  """

  def loss_and_grads(params, batch_stats, rngs, images, targets):
    def loss_fn(p):
      # copy=True: fresh Variables in the grad trace, so the model may update its BatchNorm
      # statistics and RNG counters (the closed-over ones belong to the outer trace).
      model = nnx.merge(graphdef, p, batch_stats, rngs, copy=True)
      logits = model(images)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      _, _, new_stats, new_rngs = split_model(model)
      return loss, (new_stats, new_rngs)
    (loss, (stats, new_rngs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, stats, new_rngs

  def accumulate(state, images, targets):
    def body(carry, micro):
      grad_sum, loss_sum, stats, rngs = carry
      loss, grads, stats, rngs = loss_and_grads(state.params, stats, rngs, *micro)
      return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, stats, rngs), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    carry = (zeros, jnp.zeros((), jnp.float32), state.batch_stats, state.rngs)
    micro = _microbatches((images, targets), grad_accum_steps, microbatch_sharding)
    (grad_sum, loss_sum, stats, rngs), _ = jax.lax.scan(body, carry, micro)
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
    return loss_sum / grad_accum_steps, grads, stats, rngs

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    mix_rng, noise_rng = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step))
    images = normalize(batch['image'], mean, std)
    if 'erase' in batch:
      images = fill_boxes(noise_rng, images, batch['erase'])
    images, targets = mixup_cutmix(mix_rng, images, batch['label'], num_classes, **mixup)
    if grad_accum_steps == 1:
      loss, grads, stats, rngs = loss_and_grads(state.params, state.batch_stats, state.rngs,
                                                images, targets)
    else:
      loss, grads, stats, rngs = accumulate(state, images, targets)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats, rngs=rngs,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def model_variables(state: TrainState):
  """What `eval_step` takes of a train state: (params, batch_stats, rngs)."""
  return state.params, state.batch_stats, state.rngs
