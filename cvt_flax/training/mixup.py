"""Mixup / CutMix with label smoothing, timm's `Mixup` in batch mode, as a pure (jit-able) JAX function.

Per batch: with probability `prob` the batch is mixed with its reverse (`images[::-1]`), by CutMix
with probability `switch_prob` (when both alphas are > 0), else by Mixup; lam ~ Beta(alpha, alpha).
CutMix pastes a box of side sqrt(1 - lam) of the reversed batch (centre uniform, clipped at the
border) and corrects lam to 1 - box area / image area. Targets are lam * y + (1 - lam) * y[::-1] of
label-smoothed one-hots (off = smoothing / classes, on = 1 - smoothing + off).
"""
import jax
import jax.numpy as jnp
import ml_collections


def default_mixup_config() -> ml_collections.ConfigDict:
  """timm's Mixup (batch mode) as used by the official CvT recipe."""
  cfg = ml_collections.ConfigDict()
  cfg.mixup_alpha = 0.8
  cfg.cutmix_alpha = 1.0
  cfg.switch_prob = 0.5  # Probability of CutMix when both alphas are > 0.
  cfg.prob = 1.0  # Probability of mixing a batch at all.
  cfg.label_smoothing = 0.1
  return cfg


def smoothed_one_hot(labels, num_classes, label_smoothing):
  off_value = label_smoothing / num_classes
  on_value = 1.0 - label_smoothing + off_value
  return jax.nn.one_hot(labels, num_classes) * (on_value - off_value) + off_value


def _cutmix_box_mask(rng, lam, height, width):
  """timm's rand_bbox: an (H, W) bool mask of the box and the corrected lam (1 - box fraction)."""
  cy_key, cx_key = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(cy_key, (), 0, height)
  cx = jax.random.randint(cx_key, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  corrected = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  return mask, corrected


def mixup_cutmix(rng, images, labels, num_classes, *, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, prob=1.0, label_smoothing=0.1):
  """Mixes an NHWC batch. Returns (images, soft targets float32 (N, num_classes)).

  The alphas/probabilities are Python floats (static); with prob 0 or both alphas 0 the images come
  back unchanged with label-smoothed one-hot targets.
  """
  targets = smoothed_one_hot(labels, num_classes, label_smoothing)
  if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
    return images, targets
  apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  box, lam_box = _cutmix_box_mask(box_key, lam_cutmix, images.shape[1], images.shape[2])

  flipped = images[::-1]
  mixed = lam_mixup * images.astype(jnp.float32) + (1.0 - lam_mixup) * flipped.astype(jnp.float32)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  apply = jax.random.uniform(apply_key) < prob
  out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed.astype(images.dtype)), images)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)
  return out, lam * targets + (1.0 - lam) * targets[::-1]
