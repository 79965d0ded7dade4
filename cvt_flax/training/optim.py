"""Optimizer of the official CvT recipe: AdamW, linear lr scaling, warmup + cosine, decay mask.

The official code (timm's AdamW + CosineLRScheduler) steps the schedule once per epoch; we step it
once per optimizer step, the usual JAX practice, which gives the same curve sampled more finely.
"""
from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from cvt_flax.errors import ConfigError

# Leaves named like this are weight matrices / conv filters and get weight decay. Everything else
# (biases, LayerNorm and BatchNorm scale/bias, the cls token) does not, as in the official recipe.
DECAYED_LEAF_NAMES = frozenset({'kernel'})


def default_optimizer_config() -> ConfigDict:
  """The official CvT-13 ImageNet recipe (CvT-21/W24 use weight_decay 0.1)."""
  return ConfigDict(dict(
      base_lr=2e-3,            # peak lr at `base_batch_size`; scaled linearly with the global batch
      base_batch_size=2048,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      warmup_epochs=5.0,       # used when warmup_steps < 0
      warmup_steps=-1,
      warmup_init_lr=1e-6,     # lr of the first step
      min_lr=1e-5,             # lr at the end of the cosine
      grad_clip_norm=0.0,      # 0 disables clipping (the official recipe does not clip)
  ))


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int) -> float:
  """Linear scaling rule: `base_lr` is the peak lr at `base_batch_size` images per step."""
  return base_lr * batch_size / base_batch_size


def _leaf_name(path) -> str:
  """Name of the variable a pytree path points at (skipping the `.value` of an nnx.Variable)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
  return ''


def weight_decay_mask(params: Any) -> Any:
  """Tree of bools like `params`: True where weight decay applies (kernels only)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_LEAF_NAMES, params)


def warmup_steps(opt_cfg: ConfigDict, steps_per_epoch: int) -> int:
  """The warmup's length in optimizer steps: `warmup_steps`, or if < 0 `warmup_epochs`."""
  if opt_cfg.warmup_steps >= 0:
    return opt_cfg.warmup_steps
  return int(round(opt_cfg.warmup_epochs * steps_per_epoch))


def make_lr_schedule(opt_cfg: ConfigDict, *, batch_size: int, total_steps: int,
                     steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from `warmup_init_lr` to the scaled peak, then cosine down to `min_lr`.

  `schedule(k)` is the lr of the (k+1)-th optimizer step: schedule(0) = warmup_init_lr,
  schedule(warmup) = peak, schedule(total_steps) = min_lr. A warmup that does not end before
  the run does is a ConfigError naming both lengths.
  """
  peak = scaled_learning_rate(opt_cfg.base_lr, batch_size, opt_cfg.base_batch_size)
  warmup = warmup_steps(opt_cfg, steps_per_epoch)
  if warmup >= total_steps:
    source = (f'optimizer.warmup_steps={warmup}' if opt_cfg.warmup_steps >= 0 else
              f'optimizer.warmup_epochs={opt_cfg.warmup_epochs:g} x {steps_per_epoch} steps per '
              'epoch')
    raise ConfigError(f'config: a warmup of {warmup} steps ({source}) reaches the end of the run '
                      f'at {total_steps} steps, so the learning rate would never decay: set '
                      f'--config.optimizer.warmup_steps below {total_steps} (a twentieth of the '
                      'run is usual for fine-tuning).')
  return optax.warmup_cosine_decay_schedule(
      init_value=opt_cfg.warmup_init_lr, peak_value=peak, warmup_steps=warmup,
      decay_steps=total_steps, end_value=opt_cfg.min_lr)


def make_optimizer(opt_cfg: ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (decoupled decay scaled by the lr, as torch.optim.AdamW) with the decay mask."""
  adamw = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                      weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask)
  if opt_cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), adamw)
  return adamw
